"""Sending to Telegram: `_SendingMixin`, which `TelegramAdapter` inherits, and `_TelegramStream`,
the reply stream that posts and edits an answer as it grows.

Every Bot API call goes through `_call`, which waits out flood control (RetryAfter) and retries
network faults instead of losing a reply. Messages are sent formatted (Markdown turned into
Telegram HTML) and again as plain text when Telegram refuses the formatting. Notices go out
through a per-chat outbox, in order and apart from the handling, so Telegram's send limits delay
only that chat's notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

# Read `RetryAfter.retry_after` as a timedelta, python-telegram-bot's coming behaviour, instead
# of an int with a deprecation warning each time.
os.environ.setdefault("PTB_TIMEDELTA", "1")

from telegram import ReplyParameters  # noqa: E402
from telegram.constants import ParseMode  # noqa: E402
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError  # noqa: E402

from bot.core.errors import AdapterError  # noqa: E402

from .base import EditingReplyStream, EditThrottle, ReplyStream, split_message  # noqa: E402
from .formatting import markdown_to_telegram_html  # noqa: E402
from .telegram_polling import _Lane  # noqa: E402

if TYPE_CHECKING:
    from telegram.ext import Application

    from bot.core.types import ConversationKey

log = logging.getLogger("parley.telegram")

MAX_LENGTH = 4096
SEND_ATTEMPTS = 5
MAX_QUEUED_NOTICES = 100  # per chat; past that a flood's notices are dropped, not queued


def _parse_key(key: str) -> tuple[int, int | None]:
    chat, _, thread = key.partition(":")
    return int(chat), (int(thread) if thread else None)


class _TelegramStream(EditingReplyStream):
    def __init__(
        self, adapter: _SendingMixin, chat_id: int, thread_id: int | None, reply_to: int | None, resume: Sequence[int] = ()
    ) -> None:
        super().__init__(adapter.throttle, chat_id, resume)  # type: ignore[arg-type]
        self.adapter = adapter
        self.chat_id = chat_id
        self.thread_id = thread_id
        self.reply_to = reply_to

    def split(self, text: str) -> list[str]:
        return split_message(text, MAX_LENGTH)

    async def send(self, chunk: str, index: int) -> int:
        reply_to = self.reply_to if index == 0 else self.messages[-1][0]
        return await self.adapter.send_text(self.chat_id, self.thread_id, chunk, reply_to=reply_to)  # type: ignore[arg-type]

    async def edit(self, message_id: object, chunk: str) -> None:
        await self.adapter.edit(self.chat_id, message_id, chunk)  # type: ignore[arg-type]


class _SendingMixin:
    """Sending: replies (through `_TelegramStream`), single messages, edits and the notice outbox."""

    application: Application | None
    throttle: EditThrottle
    _chats: dict[int, _Lane]

    async def open_reply(
        self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()
    ) -> ReplyStream:
        chat_id, thread_id = _parse_key(conversation.key)
        reply = int(reply_to) if reply_to and reply_to.isdigit() else None
        return _TelegramStream(self, chat_id, thread_id, reply, [int(i) for i in resume if i.isdigit()])

    async def _call(self, what: str, call):  # noqa: ANN001, ANN202
        """Run a Bot API call, waiting out flood control (RetryAfter) instead of losing the reply."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                return await call()
            except RetryAfter as exc:
                wait = exc.retry_after.total_seconds() if hasattr(exc.retry_after, "total_seconds") else float(exc.retry_after)
                if attempt == SEND_ATTEMPTS:
                    raise
                log.warning("Telegram flood control on %s: waiting %.1f s", what, wait)
                await asyncio.sleep(wait)
            except (NetworkError, asyncio.TimeoutError) as exc:
                if isinstance(exc, BadRequest | Forbidden) or attempt == SEND_ATTEMPTS:
                    raise
                log.warning("Telegram %s failed (%s); retrying", what, exc)
                await asyncio.sleep(min(2**attempt, 10))
        raise AssertionError("unreachable")

    async def send_text(self, chat_id: int, thread_id: int | None, text: str, *, reply_to: int | None = None) -> int:
        """Send one message (≤ 4096 characters), formatted when Telegram accepts it, else plain."""
        bot = self._bot()
        reply = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True) if reply_to else None

        async def send(formatted: bool):  # noqa: ANN202
            return await bot.send_message(
                chat_id,
                markdown_to_telegram_html(text) if formatted else text,
                parse_mode=ParseMode.HTML if formatted else None,
                reply_parameters=reply,
                message_thread_id=thread_id,
            )

        try:
            message = await self._call("sendMessage", lambda: send(True))
        except BadRequest as exc:
            if "parse entities" not in str(exc).lower() and "too long" not in str(exc).lower():
                raise
            message = await self._call("sendMessage", lambda: send(False))
        return message.message_id

    async def edit(self, chat_id: int, message_id: int, text: str) -> None:
        bot = self._bot()

        async def edit(formatted: bool):  # noqa: ANN202
            return await bot.edit_message_text(
                markdown_to_telegram_html(text) if formatted else text,
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML if formatted else None,
            )

        try:
            await self._call("editMessageText", lambda: edit(True))
        except BadRequest as exc:
            reason = str(exc).lower()
            if "not modified" in reason:
                return
            if "parse entities" not in reason and "too long" not in reason:
                raise
            try:
                await self._call("editMessageText", lambda: edit(False))
            except BadRequest as again:
                if "not modified" not in str(again).lower():
                    raise

    async def _send_notice(self, chat_id: int, thread_id: int | None, text: str, reply_to: int | None) -> None:
        for chunk in split_message(text, MAX_LENGTH):
            await self.send_text(chat_id, thread_id, chunk, reply_to=reply_to)

    def _notify(self, chat_id: int, thread_id: int | None, text: str, reply_to: int | None) -> None:
        """Queue a notice in the chat's outbox; it is sent in order, without holding up any handling."""
        lane = self._chats.setdefault(chat_id, _Lane())
        if len(lane.notices) >= MAX_QUEUED_NOTICES:
            log.debug("chat %s has %d notices waiting; dropping one", chat_id, len(lane.notices))
            return
        lane.notices.append((thread_id, text, reply_to))
        if lane.sender is None:
            lane.sender = asyncio.create_task(self._run_sender(chat_id, lane), name=f"parley-telegram-notices-{chat_id}")

    async def _run_sender(self, chat_id: int, lane: _Lane) -> None:
        try:
            while lane.notices:
                thread_id, text, reply_to = lane.notices.popleft()
                try:
                    await self._send_notice(chat_id, thread_id, text, reply_to)
                except (TelegramError, AdapterError) as exc:
                    log.warning("could not send a notice to Telegram chat %s: %s", chat_id, exc)
        finally:
            lane.sender = None
            self._forget_if_idle(chat_id, lane)

    def _bot(self):  # noqa: ANN202
        if self.application is None:
            raise AdapterError("the Telegram adapter is not running")
        return self.application.bot

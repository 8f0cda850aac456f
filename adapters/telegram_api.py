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

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters  # noqa: E402
from telegram.constants import ParseMode  # noqa: E402
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError  # noqa: E402

from bot.core.contracts import Control  # noqa: E402
from bot.core.errors import AdapterError  # noqa: E402

from .base import EditingReplyStream, EditThrottle, ReplyStream, split_message  # noqa: E402
from .formatting import markdown_to_telegram_html  # noqa: E402
from .telegram_polling import MAX_LENGTH, _Lane  # noqa: E402

if TYPE_CHECKING:
    from telegram.ext import Application

    from bot.core.types import ConversationKey

log = logging.getLogger("parley.telegram")

SEND_ATTEMPTS = 5
MAX_QUEUED_NOTICES = 100  # per chat; past that a flood's notices are dropped, not queued


BUTTONS = {
    Control.STOP: ("⏹ Stop", "stop"),
    Control.REGENERATE: ("🔄 Regenerate", "regen"),
    Control.CONTINUE: ("➡️ Continue", "cont"),
}
"""Each control's button label and its word in `callback_data` ("p:<word>:<job id>", well under
Telegram's 64 bytes, and enough to act on after a restart: the job id names the reply)."""
CALLBACK_PREFIX = "p"
NO_KEYBOARD = InlineKeyboardMarkup(())
"""An empty inline keyboard: sent to remove one (editMessageReplyMarkup)."""
_KEYBOARD_GONE = ("not modified", "message to edit not found", "message can't be edited")
"""editMessageReplyMarkup refusals that leave nothing to do: the keyboard already is as asked, or
the message is gone."""


def _parse_key(key: str) -> tuple[int, int | None]:
    chat, _, thread = key.partition(":")
    return int(chat), (int(thread) if thread else None)


def keyboard(job_id: int | None, controls: Sequence[Control]) -> InlineKeyboardMarkup | None:
    """The inline keyboard showing `controls` for job `job_id`; None when there is nothing to show."""
    if job_id is None or not controls:
        return None
    row = [InlineKeyboardButton(BUTTONS[c][0], callback_data=f"{CALLBACK_PREFIX}:{BUTTONS[c][1]}:{job_id}") for c in controls]
    return InlineKeyboardMarkup([row])


def parse_callback_data(data: str | None) -> tuple[Control, int] | None:
    """The control and job id a button's `callback_data` names; None for anything else (a foreign
    or malformed button: it is answered and otherwise ignored)."""
    prefix, _, rest = (data or "").partition(":")
    word, _, job = rest.partition(":")
    control = next((c for c, (_, w) in BUTTONS.items() if w == word), None)
    if prefix != CALLBACK_PREFIX or control is None or not job.isdigit() or len(job) > 18:
        return None
    return control, int(job)


class _TelegramStream(EditingReplyStream):
    """A reply that grows by edits; its controls (an inline keyboard) ride on its last message only.

    Which keyboard each message shows is tracked (`keyboards`; a resumed message's is unknown);
    after each render a message whose keyboard is not the one it should have gets it by
    editMessageReplyMarkup: the finished reply swapping Stop for Regenerate with its text unchanged,
    or a message that stopped being the last when the reply grew into a new one."""

    def __init__(
        self, adapter: _SendingMixin, chat_id: int, thread_id: int | None, reply_to: int | None, resume: Sequence[int] = ()
    ) -> None:
        super().__init__(adapter.throttle, chat_id, resume)  # type: ignore[arg-type]
        self.adapter = adapter
        self.chat_id = chat_id
        self.thread_id = thread_id
        self.reply_to = reply_to
        self.keyboards: dict[object, tuple[Control, ...]] = {}
        """The controls each posted message shows (absent: unknown, a resumed message)."""
        self._last_index = 0  # the index of the message that carries the controls in this render

    def split(self, text: str) -> list[str]:
        return split_message(text, MAX_LENGTH)

    def _wanted(self, index: int) -> tuple[Control, ...]:
        return self.controls if index == self._last_index and self.job_id is not None else ()

    async def send(self, chunk: str, index: int) -> int:
        reply_to = self.reply_to if index == 0 else self.messages[-1][0]
        wanted = self._wanted(index)
        message_id = await self.adapter.send_text(
            self.chat_id, self.thread_id, chunk, reply_to=reply_to, markup=keyboard(self.job_id, wanted)  # type: ignore[arg-type]
        )
        self.keyboards[message_id] = wanted
        return message_id

    async def edit(self, message_id: object, chunk: str) -> None:
        # editMessageText without a keyboard removes the one shown: the last message names its own.
        index = next((i for i, (known, _) in enumerate(self.messages) if known == message_id), -1)
        wanted = self._wanted(index) if chunk != "…" else ()
        await self.adapter.edit(self.chat_id, message_id, chunk, markup=keyboard(self.job_id, wanted))  # type: ignore[arg-type]
        self.keyboards[message_id] = wanted

    async def fail(self, notice: str) -> None:
        self.controls = ()  # an error notice carries no controls
        await super().fail(notice)

    async def _render_from(self, start: int, text: str, *, final: bool) -> None:
        self._last_index = start + max(len([chunk for chunk in self.split(text) if chunk.strip()]), 1) - 1
        await super()._render_from(start, text, final=final)
        await self._settle_keyboards(final=final)

    async def _settle_keyboards(self, *, final: bool) -> None:
        """Give each message the keyboard it should show, where the text render did not."""
        for index, (message_id, _) in enumerate(self.messages):
            wanted = self._wanted(index)
            if self.keyboards.get(message_id) == wanted:
                continue
            change = lambda message_id=message_id, wanted=wanted: self.adapter.set_keyboard(  # noqa: E731
                self.chat_id, message_id, keyboard(self.job_id, wanted)  # type: ignore[arg-type]
            )
            try:
                await (self._retrying(change) if final else change())
            except Exception as exc:  # noqa: BLE001 - the text is shown; a stale control is refused when pressed
                if not final:
                    raise
                log.warning("could not set the controls of a reply message (%s)", exc)
                continue
            self.keyboards[message_id] = wanted


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

    async def send_text(
        self,
        chat_id: int,
        thread_id: int | None,
        text: str,
        *,
        reply_to: int | None = None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> int:
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
                reply_markup=markup,
            )

        try:
            message = await self._call("sendMessage", lambda: send(True))
        except BadRequest as exc:
            if "parse entities" not in str(exc).lower() and "too long" not in str(exc).lower():
                raise
            message = await self._call("sendMessage", lambda: send(False))
        return message.message_id

    async def edit(self, chat_id: int, message_id: int, text: str, *, markup: InlineKeyboardMarkup | None = None) -> None:
        """Replace a message's text (and its inline keyboard: none unless `markup` is given)."""
        bot = self._bot()

        async def edit(formatted: bool):  # noqa: ANN202
            return await bot.edit_message_text(
                markdown_to_telegram_html(text) if formatted else text,
                chat_id=chat_id,
                message_id=message_id,
                parse_mode=ParseMode.HTML if formatted else None,
                reply_markup=markup,
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

    async def set_keyboard(self, chat_id: int, message_id: int, markup: InlineKeyboardMarkup | None) -> None:
        """Show `markup` (None: no keyboard) under a message, its text untouched (editMessageReplyMarkup).
        Raises only when Telegram refuses for a reason other than there being nothing to do."""
        bot = self._bot()
        try:
            await self._call(
                "editMessageReplyMarkup",
                lambda: bot.edit_message_reply_markup(chat_id=chat_id, message_id=message_id, reply_markup=markup or NO_KEYBOARD),
            )
        except BadRequest as exc:
            if not any(reason in str(exc).lower() for reason in _KEYBOARD_GONE):
                raise

    async def clear_controls(self, conversation: ConversationKey, message_ids: Sequence[str]) -> None:
        chat_id, _ = _parse_key(conversation.key)
        for message_id in message_ids:
            if not message_id.isdigit():
                continue
            try:
                await self.set_keyboard(chat_id, int(message_id), None)
            except (TelegramError, AdapterError) as exc:  # best effort: pressing a stale control is refused
                log.warning("could not remove the controls of message %s in chat %s: %s", message_id, chat_id, exc)

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

"""Telegram, through python-telegram-bot's `Application`, started inside Parley's own event loop
(`initialize()` / `start()`, never `run_polling()`, which owns the loop).

Polling is Parley's own small loop rather than PTB's `Updater`: the Updater confirms a batch of
updates to Telegram (the next getUpdates offset) as soon as it has queued them, before they are
handled, so a crash in between loses them for good. Here an update is confirmed only after the
router has recorded it; one redelivered after a crash is recognised and answered once.

One conversation per chat, and per topic in forum supergroups. In private chats the bot answers
every text message; in groups it answers when mentioned, when replied to, or through `/ask`, and
keeps other messages as context. No Telegram object passes this module's edge.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

# Read `RetryAfter.retry_after` as a timedelta, python-telegram-bot's coming behaviour, instead
# of an int with a deprecation warning each time.
os.environ.setdefault("PTB_TIMEDELTA", "1")

from telegram import BotCommand, ReplyParameters, Update  # noqa: E402
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, MessageEntityType, ParseMode  # noqa: E402
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError  # noqa: E402
from telegram.ext import AIORateLimiter, Application, ContextTypes, TypeHandler  # noqa: E402

from bot.conversation import COMMANDS, messages, parse_command  # noqa: E402
from bot.core.contracts import Outcome  # noqa: E402
from bot.core.errors import AdapterError  # noqa: E402
from bot.core.types import Author, ConversationKey, IncomingMessage  # noqa: E402

from .base import Adapter, Core, EditingReplyStream, EditThrottle, ReplyStream, split_message  # noqa: E402
from .formatting import markdown_to_telegram_html  # noqa: E402

if TYPE_CHECKING:
    from telegram import Message

    from bot.core.config import Settings, TelegramSettings

__all__ = ["TelegramAdapter"]

log = logging.getLogger("parley.telegram")

MAX_LENGTH = 4096
TEXT_ONLY = messages.TEXT_ONLY
TYPING_EVERY = 4.5  # Telegram shows "typing…" for about 5 seconds per action
TELEGRAM_ONLY = {"start", "ask"}
"""Telegram's own commands: /start (every bot has one) and /ask (groups, where plain messages are context)."""
MENU = [("start", "Say hello and list the commands"), ("ask", "Ask the bot in a group: /ask your question")]
MENU += [(command.name, command.help[:256]) for command in COMMANDS]
SEND_ATTEMPTS = 5
POLL_TIMEOUT = 25  # seconds a getUpdates long poll may wait for news


def _parse_key(key: str) -> tuple[int, int | None]:
    chat, _, thread = key.partition(":")
    return int(chat), (int(thread) if thread else None)


class _TelegramStream(EditingReplyStream):
    def __init__(
        self, adapter: TelegramAdapter, chat_id: int, thread_id: int | None, reply_to: int | None, resume: Sequence[int] = ()
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


class TelegramAdapter(Adapter):
    """Parley on Telegram. Build with `from_config`; the token is read from the environment."""

    platform = "telegram"
    max_message_length = MAX_LENGTH

    def __init__(self, config: TelegramSettings, token: str, *, bot_name: str = "Parley") -> None:
        self.config = config
        self.edit_interval = config.edit_interval
        self.bot_name = bot_name
        self._token = token
        self.application: Application | None = None
        self.core: Core | None = None
        self.username = ""
        self.bot_id = 0
        self._admin_cache: dict[tuple[int, int], tuple[float, bool]] = {}
        self._seen_updates: OrderedDict[int, None] = OrderedDict()
        self.throttle = EditThrottle(config.edit_interval)
        self._background: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None

    @classmethod
    def from_config(cls, settings: Settings) -> TelegramAdapter:
        token = settings.secret("telegram", "token_env", settings.telegram.token_env)
        return cls(settings.telegram, token, bot_name=settings.bot.name)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, core: Core) -> None:
        self.core = core
        base = self.config.api_base_url.rstrip("/")
        file_base = base[: -len("/bot")] + "/file/bot" if base.endswith("/bot") else base + "/file/bot"
        application = (
            Application.builder()
            .token(self._token)
            .base_url(base)
            .base_file_url(file_base)
            .rate_limiter(AIORateLimiter(max_retries=3))
            .updater(None)
            .build()
        )
        application.add_handler(TypeHandler(Update, self._on_update))
        application.add_error_handler(self._on_error)
        try:
            await application.initialize()
        except InvalidToken:
            await application.bot.shutdown()
            raise AdapterError(
                f"Telegram rejected the bot token in ${self.config.token_env}; copy it again from BotFather"
            ) from None
        except (NetworkError, TelegramError) as exc:
            await application.bot.shutdown()
            raise AdapterError(f"could not reach the Telegram Bot API at {base}: {exc}") from None
        self.application = application
        self.username = application.bot.username
        self.bot_id = application.bot.id
        core.set_bot_username(self.platform, self.username)
        try:
            await application.bot.set_my_commands([BotCommand(name, text) for name, text in MENU])
        except TelegramError as exc:
            log.warning("could not register the command menu with setMyCommands: %s", exc)
        await application.start()
        try:
            await application.bot.delete_webhook()  # polling and a webhook exclude each other
        except TelegramError as exc:
            log.warning("could not remove a webhook before polling: %s", exc)
        self._poller = asyncio.create_task(self._poll(), name="parley-telegram-poll")
        log.info("Telegram: polling as @%s", self.username)

    async def _poll(self) -> None:
        """Long-poll getUpdates; each update is handled before its offset is confirmed."""
        offset: int | None = None
        failures = 0
        while self.application is not None:
            try:
                updates = await self.application.bot.get_updates(
                    offset=offset, timeout=POLL_TIMEOUT, allowed_updates=[Update.MESSAGE, Update.EDITED_MESSAGE]
                )
            except InvalidToken:
                log.error("Telegram no longer accepts the bot token in $%s; polling stopped", self.config.token_env)
                return
            except (NetworkError, TelegramError) as exc:  # includes TimedOut and Conflict
                failures += 1
                delay = min(2.0**failures, 30.0)
                log.warning("Telegram getUpdates failed (%s); trying again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            for update in updates:
                try:
                    await self.application.process_update(update)
                except Exception:
                    log.exception("handling Telegram update %s failed", update.update_id)
                offset = update.update_id + 1

    async def stop(self) -> None:
        application, self.application = self.application, None
        poller, self._poller = self._poller, None
        for task in [*self._background, *([poller] if poller else [])]:
            task.cancel()
        await asyncio.gather(*self._background, *([poller] if poller else []), return_exceptions=True)
        if application is None:
            return
        if application.running:
            await application.stop()
        await application.shutdown()

    # -- sending ---------------------------------------------------------------------------------

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

    def _bot(self):  # noqa: ANN202
        if self.application is None:
            raise AdapterError("the Telegram adapter is not running")
        return self.application.bot

    # -- receiving -------------------------------------------------------------------------------

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("error while handling a Telegram update", exc_info=context.error)

    def _first_time(self, update_id: int) -> bool:
        if update_id in self._seen_updates:
            return False
        self._seen_updates[update_id] = None
        while len(self._seen_updates) > 10_000:
            self._seen_updates.popitem(last=False)
        return True

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not self._first_time(update.update_id) or self.core is None:
            return
        message = update.message or update.edited_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        chat = message.chat
        if self.config.allowed_chat_ids and chat.id not in self.config.allowed_chat_ids:
            log.info("ignoring a message from chat %s, which is not in [telegram] allowed_chat_ids", chat.id)
            return
        private = chat.type == ChatType.PRIVATE
        thread_id = message.message_thread_id if chat.is_forum and message.is_topic_message else None
        conversation = ConversationKey(self.platform, f"{chat.id}:{thread_id}" if thread_id else str(chat.id))
        text = message.text
        if update.edited_message is not None:
            if text:
                await self.core.handle_edit(self._incoming(message, conversation, text, private, addressed=False, admin=False))
            return
        if text is None:
            if private:
                await self._send_notice(chat.id, thread_id, TEXT_ONLY, message.message_id)
            return
        addressed = private
        command = parse_command(text, self.username) if text.startswith("/") else None
        if text.startswith("/") and command is None:
            return  # a command for another bot
        if command is not None:
            explicit = text.split(maxsplit=1)[0].lower().endswith("@" + self.username.lower())
            if not private and command.name not in COMMANDS and command.name not in TELEGRAM_ONLY and not explicit:
                return  # some other bot's command, sent to the whole group
            if command.name == "start":
                await self._send_notice(chat.id, thread_id, self._welcome(), message.message_id)
                return
            if command.name == "ask":
                if not command.args:
                    await self._send_notice(chat.id, thread_id, "Usage: /ask your question", message.message_id)
                    return
                text, addressed, command = command.args, True, None
        else:
            stripped = self._strip_mention(message, text)
            if stripped is not None:
                text, addressed = stripped, True
            elif self._replies_to_bot(message):
                addressed = True
        admin = command is not None and await self._is_admin(message, private)
        incoming = self._incoming(message, conversation, text, private, addressed=addressed, admin=admin)
        result = await self.core.handle(incoming)
        if result.reply:
            await self._send_notice(chat.id, thread_id, result.reply, message.message_id)
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            task = asyncio.create_task(self._typing_until_done(chat.id, thread_id, result.job_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _incoming(
        self, message: Message, conversation: ConversationKey, text: str, private: bool, *, addressed: bool, admin: bool
    ) -> IncomingMessage:
        user = message.from_user
        reply = message.reply_to_message
        # In forum topics every message "replies" to the topic's opening message; that is no reply.
        reply_to = str(reply.message_id) if reply is not None and not reply.forum_topic_created else None
        return IncomingMessage(
            conversation=conversation,
            message_id=str(message.message_id),
            author=Author(id=str(user.id), name=user.full_name or user.username or str(user.id), is_admin=admin),
            text=text,
            is_direct=private,
            addressed=addressed,
            reply_to=reply_to,
            sent_at=message.date,
        )

    def _welcome(self) -> str:
        return (
            f"Hi, I'm {self.bot_name}. In a private chat I answer every message; in a group, mention me "
            f"(@{self.username}), reply to one of my messages, or use /ask.\n" + "\n".join(COMMANDS.help_lines())
        )

    def _strip_mention(self, message: Message, text: str) -> str | None:
        """The text without the @mention of this bot, or None if the bot is not mentioned."""
        target = "@" + self.username.lower()
        for entity in message.entities or ():
            if entity.type == MessageEntityType.MENTION:
                mention = message.parse_entity(entity)
                if mention.lower() == target:
                    return (text.replace(mention, "", 1).strip() or text).strip()
            elif entity.type == MessageEntityType.TEXT_MENTION and entity.user and entity.user.id == self.bot_id:
                return text
        return None

    def _replies_to_bot(self, message: Message) -> bool:
        reply = message.reply_to_message
        return bool(reply and reply.from_user and reply.from_user.id == self.bot_id and not reply.forum_topic_created)

    async def _is_admin(self, message: Message, private: bool) -> bool:
        """Private chat: the user. Groups: the chat's creator and administrators (asked of Telegram,
        cached), anonymous admins posting as the group, and [telegram] admin_user_ids."""
        user_id, chat_id = message.from_user.id, message.chat.id
        if private or user_id in self.config.admin_user_ids:
            return True
        if message.sender_chat is not None and message.sender_chat.id == chat_id:
            return True
        cached = self._admin_cache.get((chat_id, user_id))
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            member = await self._call("getChatMember", lambda: self._bot().get_chat_member(chat_id, user_id))
        except TelegramError as exc:
            log.warning("could not ask Telegram whether user %s administers chat %s: %s", user_id, chat_id, exc)
            return False
        is_admin = member.status in (ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR)
        self._admin_cache[(chat_id, user_id)] = (time.monotonic() + self.config.admin_cache_seconds, is_admin)
        return is_admin

    async def _typing_until_done(self, chat_id: int, thread_id: int | None, job_id: int) -> None:
        """Show "typing…" while the job waits and runs."""
        assert self.core is not None
        done = asyncio.ensure_future(self.core.wait_for(job_id))
        try:
            while not done.done():
                try:
                    await self._bot().send_chat_action(chat_id, ChatAction.TYPING, message_thread_id=thread_id)
                except TelegramError as exc:
                    log.debug("typing action failed in chat %s: %s", chat_id, exc)
                await asyncio.wait({done}, timeout=TYPING_EVERY)
        finally:
            done.cancel()

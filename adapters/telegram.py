"""Telegram, through python-telegram-bot's `Application`, started inside Parley's own event loop
(`initialize()` / `start()`, never `run_polling()`, which owns the loop).

Polling is Parley's own small loop rather than PTB's `Updater`: the Updater confirms a batch of
updates to Telegram (the next getUpdates offset) as soon as it has queued them, before they are
handled, so a crash in between loses them for good. Here an update is confirmed only after the
router has recorded it (or deliberately refused it): the offset moves up to the lowest update
still in hand. One redelivered after a crash is recognised by the database and takes effect once.

Each chat's updates are handled in order by a worker of its own, so one busy or flooding chat
never holds up another; answers and notices go out through a per-chat outbox, apart from the
handling, so Telegram's send limits (20 a minute in a group, flood waits) delay only that chat's
notices. While storage is unavailable, a chat's worker keeps its update unconfirmed and tries it
again with a growing pause; operators get one log line when the outage starts and one when it ends.

One conversation per chat, and per topic in forum supergroups. In private chats the bot answers
every text message; in groups it answers when mentioned, when replied to, or through `/ask`, and
keeps other messages as context. No Telegram object passes this module's edge.

A text longer than Telegram's 4,096 characters arrives as several messages, cut by the client: a
message at the limit is held for about a second (its chat's lane only), and the parts that follow it
from the same author are joined to it into one question (see `telegram_polling`).

Replies carry their controls (Stop, Regenerate, Continue) as an inline keyboard on their last
message (`telegram_api`); a press arrives as a callback query, handled in its chat's lane like a
message, and is always answered (the text, when there is one, shows to the presser alone).

The polling loop and its per-chat lanes are in `telegram_polling`, the sending helpers (flood
control, the outbox, the reply stream) in `telegram_api`; `TelegramAdapter` inherits both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

# Read `RetryAfter.retry_after` as a timedelta, python-telegram-bot's coming behaviour, instead
# of an int with a deprecation warning each time.
os.environ.setdefault("PTB_TIMEDELTA", "1")

from telegram import BotCommand, CallbackQuery, Update  # noqa: E402
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, MessageEntityType  # noqa: E402
from telegram.error import InvalidToken, NetworkError, TelegramError  # noqa: E402
from telegram.ext import AIORateLimiter, Application  # noqa: E402

from bot.conversation import COMMANDS, messages, parse_command  # noqa: E402
from bot.core.contracts import ControlPress, Outcome  # noqa: E402
from bot.core.errors import AdapterError, StorageUnavailable  # noqa: E402
from bot.core.types import Author, ConversationKey, IncomingMessage  # noqa: E402

from .base import Adapter, Core, EditThrottle  # noqa: E402
from .lease import LeaseKeeper, account_role  # noqa: E402
from .telegram_api import MAX_LENGTH, MAX_QUEUED_NOTICES, SEND_ATTEMPTS, _parse_key, _SendingMixin, _TelegramStream, parse_callback_data  # noqa: E402, F401
from .telegram_polling import POLL_TIMEOUT, REPOLL_AFTER, STORAGE_RETRY_FIRST, STORAGE_RETRY_MAX, _Lane, _PollingMixin, join_split_text  # noqa: E402, F401

if TYPE_CHECKING:
    from telegram import Message

    from bot.core.config import Settings, TelegramSettings

__all__ = ["TelegramAdapter"]

log = logging.getLogger("parley.telegram")

TEXT_ONLY = messages.TEXT_ONLY
TYPING_EVERY = 4.5  # Telegram shows "typing…" for about 5 seconds per action
MAX_ANSWER_LENGTH = 200  # answerCallbackQuery's text limit
TELEGRAM_ONLY = {"start", "ask"}
"""Telegram's own commands: /start (every bot has one) and /ask (groups, where plain messages are context)."""
MENU = [("start", "Say hello and list the commands"), ("ask", "Ask the bot in a group: /ask your question")]
MENU += [(command.name, command.help[:256]) for command in COMMANDS]


def _thread_of(message: Message) -> int | None:
    """The forum topic a message is in; None outside forums (threads of replies are no topics)."""
    # A press on a message too old to be shown (InaccessibleMessage) carries no topic.
    return message.message_thread_id if message.chat.is_forum and getattr(message, "is_topic_message", False) else None


class TelegramAdapter(_PollingMixin, _SendingMixin, Adapter):
    """Parley on Telegram. Build with `from_config`; the token is read from the environment.
    Polling lives in `telegram_polling`, sending in `telegram_api`."""

    platform = "telegram"
    max_message_length = MAX_LENGTH
    supports_controls = True
    connected = property(lambda self: self.application is not None and self._poller is not None and not self._poller.done() and (
        (self._lease is not None and not self._lease.held) or not self._poll_failures))  # /readyz: polling and its last getUpdates worked, or a standby

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
        self._admin_sweep_at = 0.0
        self.throttle = EditThrottle(config.edit_interval)
        self._background: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._lease: LeaseKeeper | None = None
        self._poll_failures = 0  # getUpdates failures in a row (for `connected`)
        self._chats: dict[int, _Lane] = {}
        self._in_hand: set[int] = set()  # update ids received and not yet handled
        self._done_above: set[int] = set()  # handled, not yet confirmed by a getUpdates sent since
        self._highest = -1  # the highest update id received
        self._progress = asyncio.Event()
        self._storage_down = False
        self._waiting_on_storage: set[int] = set()  # chats whose worker is waiting for storage

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
        # Telegram serves one getUpdates consumer per token: processes sharing the database poll
        # in turn, by lease; every one of them sends replies.
        lease = getattr(core, "lease", None)
        if lease is None:  # a core without leases (tests of the adapter alone): poll
            self._poller = asyncio.create_task(self._poll(), name="parley-telegram-poll")
            return
        self._lease = LeaseKeeper(
            core, account_role(self.platform, self._token), self.config.lease_seconds, what="Telegram polling", log=log
        )
        self._poller = asyncio.create_task(self._lease.run(self._poll), name="parley-telegram-poll")


    async def stop(self) -> None:
        application, self.application = self.application, None
        poller, self._poller = self._poller, None
        lanes = [task for lane in self._chats.values() for task in (lane.worker, lane.sender) if task is not None]
        tasks = [*self._background, *lanes, *([poller] if poller else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release()
        # Updates in hand stay unconfirmed: Telegram delivers them again to the next start.
        self._chats.clear()
        self._in_hand.clear()
        self._done_above.clear()
        self._highest = -1
        if application is None:
            return
        if application.running:
            await application.stop()
        await application.shutdown()

    # -- receiving -------------------------------------------------------------------------------

    async def _on_update(self, update: Update, parts: tuple[Update, ...] = ()) -> None:
        """One update, start to end. Raises `StorageUnavailable` when nothing could be recorded.
        `parts`: the messages that follow a text the client split at the length limit, joined to it."""
        if self.core is None:
            return
        if update.callback_query is not None:
            await self._on_press(update.callback_query)
            return
        message = update.message or update.edited_message
        if message is None or message.from_user is None:
            return
        chat = message.chat
        if message.from_user.is_bot and not self._anonymous_admin(message):
            return
        if self.config.allowed_chat_ids and chat.id not in self.config.allowed_chat_ids:
            log.info("ignoring a message from chat %s, which is not in [telegram] allowed_chat_ids", chat.id)
            return
        private = chat.type == ChatType.PRIVATE
        thread_id = _thread_of(message)
        conversation = ConversationKey(self.platform, f"{chat.id}:{thread_id}" if thread_id else str(chat.id))
        text = message.text
        if text and parts:
            text = join_split_text([text, *(part.message.text or "" for part in parts)])
        if update.edited_message is not None:
            if text:
                await self.core.handle_edit(self._incoming(message, conversation, text, private, addressed=False, admin=False))
            return
        if text is None:
            if private:
                await self._say_once(message, conversation, TEXT_ONLY)
            return
        addressed = private
        command = parse_command(text, self.username) if text.startswith("/") else None
        if text.startswith("/") and command is None:
            return  # a command for another bot
        if command is not None:
            explicit = text.split(maxsplit=1)[0].lower().endswith("@" + self.username.lower())
            if not private and command.name not in COMMANDS and command.name not in TELEGRAM_ONLY and not explicit:
                return  # some other bot's command, sent to the whole group
            if command.name == "start" or (command.name == "export" and not private):  # a group would see the file
                await self._say_once(message, conversation, self._welcome() if command.name == "start" else messages.EXPORT_IN_PRIVATE)
                return
            if command.name == "ask":
                if not command.args:
                    await self._say_once(message, conversation, messages.ASK_USAGE)
                    return
                text, addressed, command = command.args, True, None
        else:
            stripped = self._strip_mention(message, text)
            if stripped is not None:
                text, addressed = stripped, True
            elif self._replies_to_bot(message):
                addressed = True
        # Telegram is asked only when the answer matters (a change, not /help or /status).
        declared = COMMANDS[command.name] if command is not None and command.name in COMMANDS else None
        admin = declared is not None and declared.needs_admin(command.args) and await self._is_admin(message, private)
        incoming = self._incoming(message, conversation, text, private, addressed=addressed, admin=admin)
        for part in parts:  # claimed first: after a crash the parts come again, joined again
            await self.core.claim_update(self._incoming(part.message, conversation, part.message.text or "", private))
        # Storage trouble is raised (and the update retried), not answered.
        result = await self.core.handle_update(incoming)
        if result.reply and not (private and result.attachment):
            self._notify(chat.id, thread_id, result.reply, message.message_id)
        if private and (file := result.attachment): await self._call("sendDocument", lambda: self._bot().send_document(chat.id, file.data, filename=file.filename, caption=result.reply))  # noqa: E701 - /export
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            self._show_typing(chat.id, thread_id, result.job_id)

    def _show_typing(self, chat_id: int, thread_id: int | None, job_id: int) -> None:
        task = asyncio.create_task(self._typing_until_done(chat_id, thread_id, job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_press(self, query: CallbackQuery) -> None:
        """A reply's button pressed: answered always (the client shows a spinner until then), once
        handled. While storage is unavailable the update is left unconfirmed and handled again."""
        try:
            answer = await self._press(query)
        except StorageUnavailable:
            raise
        except Exception:
            await self._answer(query.id, None)
            raise  # logged with its traceback by the chat's lane
        await self._answer(query.id, answer)

    async def _press(self, query: CallbackQuery) -> str | None:
        """Hand the press to the core; the sentence for the presser, if any."""
        parsed = parse_callback_data(query.data)
        message, user = query.message, query.from_user
        if parsed is None or message is None or user is None or user.is_bot or self.core is None:
            log.debug("ignoring a press of a button that is not Parley's (%r)", query.data)
            return None
        chat = message.chat
        if self.config.allowed_chat_ids and chat.id not in self.config.allowed_chat_ids:
            return None
        private = chat.type == ChatType.PRIVATE
        thread_id = _thread_of(message)
        conversation = ConversationKey(self.platform, f"{chat.id}:{thread_id}" if thread_id else str(chat.id))
        admin = await self._is_admin_in(chat.id, user.id, private)
        author = Author(id=str(user.id), name=user.full_name or user.username or str(user.id), is_admin=admin)
        control, job_id = parsed
        press = ControlPress(conversation, job_id, control, author, press_id=str(query.id), is_direct=private)
        result = await self.core.press(press)
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            self._show_typing(chat.id, thread_id, result.job_id)
        return result.reply

    async def _answer(self, query_id: str, text: str | None) -> None:
        if text and len(text) > MAX_ANSWER_LENGTH:
            text = text[: MAX_ANSWER_LENGTH - 1] + "…"
        try:
            await self._call(
                "answerCallbackQuery", lambda: self._bot().answer_callback_query(query_id, text=text or None, show_alert=False)
            )
        except (TelegramError, AdapterError) as exc:  # too old (answered before a restart), or gone
            log.info("could not answer a button press: %s", exc)

    async def _say_once(self, message: Message, conversation: ConversationKey, text: str) -> None:
        """A notice the adapter answers by itself, sent unless its update was handled before."""
        incoming = self._incoming(message, conversation, message.text or "", message.chat.type == ChatType.PRIVATE)
        if await self.core.claim_update(incoming):
            self._notify(message.chat.id, _thread_of(message), text, message.message_id)

    def _incoming(
        self,
        message: Message,
        conversation: ConversationKey,
        text: str,
        private: bool,
        *,
        addressed: bool = False,
        admin: bool = False,
    ) -> IncomingMessage:
        user = message.from_user
        reply = message.reply_to_message
        # In forum topics every message "replies" to the topic's opening message; that is no reply.
        reply_to = str(reply.message_id) if reply is not None and not reply.forum_topic_created else None
        if self._anonymous_admin(message):  # posting as the group: the group is the author
            sender = message.sender_chat
            name = message.author_signature or sender.title or "Anonymous admin"
            author = Author(id=str(sender.id), name=name, is_admin=admin)
        else:
            author = Author(id=str(user.id), name=user.full_name or user.username or str(user.id), is_admin=admin)
        return IncomingMessage(
            conversation=conversation,
            message_id=str(message.message_id),
            author=author,
            text=text,
            is_direct=private,
            addressed=addressed,
            reply_to=reply_to,
            sent_at=message.date,
        )

    @staticmethod
    def _anonymous_admin(message: Message) -> bool:
        """An administrator of the group posting anonymously, as the group itself (Telegram sends it
        from its GroupAnonymousBot, a bot, with `sender_chat` the group)."""
        return message.sender_chat is not None and message.sender_chat.id == message.chat.id

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
        if self._anonymous_admin(message):
            return True
        return await self._is_admin_in(message.chat.id, message.from_user.id, private)

    async def _is_admin_in(self, chat_id: int, user_id: int, private: bool) -> bool:
        """`_is_admin` for a user acting as themselves (a message, a button press)."""
        if private or user_id in self.config.admin_user_ids:
            return True
        now = time.monotonic()
        cached = self._admin_cache.get((chat_id, user_id))
        if cached and cached[0] > now:
            return cached[1]
        try:
            member = await self._call("getChatMember", lambda: self._bot().get_chat_member(chat_id, user_id))
        except TelegramError as exc:
            log.warning("could not ask Telegram whether user %s administers chat %s: %s", user_id, chat_id, exc)
            return False
        is_admin = member.status in (ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR)
        now = time.monotonic()
        if now >= self._admin_sweep_at:  # forget expired answers, at most once per cache period
            self._admin_cache = {key: entry for key, entry in self._admin_cache.items() if entry[0] > now}
            self._admin_sweep_at = now + self.config.admin_cache_seconds
        self._admin_cache[(chat_id, user_id)] = (now + self.config.admin_cache_seconds, is_admin)
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

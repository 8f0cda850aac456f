"""Discord, through discord.py 2 (`client.start()` inside Parley's own event loop, never
`client.run()`, which owns the loop).

One conversation per channel; a thread is its own conversation, and so is a DM. In DMs the bot
answers every message; in a server, when mentioned, when a message replies to one of its
messages, or any message in a configured channel. Admins steer it with slash commands. Every
message the bot sends carries `allowed_mentions` that ping nobody. No discord.py object passes
this module's edge.

This module holds `DiscordAdapter`: lifecycle, receiving messages, admin checks, replies (with
their controls as buttons on the last message). It inherits the slash commands from
`adapters.discord_commands`, what a button press does from `adapters.discord_controls`, and from
`adapters.discord_catch_up` the reading back of what was sent while the bot was away (Discord does
not redeliver it).
"""

# No `from __future__ import annotations` here: discord.py reads the slash commands' parameter
# annotations at runtime.

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands

from bot.conversation import messages, parse_command
from bot.core.contracts import Control, Outcome
from bot.core.errors import AdapterError
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Adapter, Core, EditingReplyStream, EditThrottle, ReplyStream, split_markdown
from .discord_catch_up import CATCH_UP_LIMIT as CATCH_UP_LIMIT, CATCH_UP_OVERLAP as CATCH_UP_OVERLAP, DiscordCatchUp
from .discord_commands import ADMIN_PERMISSIONS as ADMIN_PERMISSIONS, MAX_LENGTH as MAX_LENGTH, NO_PINGS as NO_PINGS
from .discord_commands import DiscordCommands, attachment_file
from .discord_controls import ControlButton, DiscordControls, controls_view
from .lease import LeaseKeeper, account_role

if TYPE_CHECKING:
    from bot.core.config import DiscordSettings, Settings

__all__ = ["DiscordAdapter"]

log = logging.getLogger("parley.discord")

TEXT_ONLY = messages.TEXT_ONLY
ANSWER_WITHIN = 2.0  # Discord wants an interaction answered within 3 s; past this, defer first


class _DiscordStream(EditingReplyStream):
    """A reply as Discord messages; its controls are buttons on the last message alone.

    Every send and edit says which buttons its message shows (`_controls_on`; None: not known, as
    for the messages of an interrupted attempt); a message that stops being the last loses its
    buttons, and `finish` and `fail` put the final ones on the last message even when its text
    did not change."""

    def __init__(
        self, adapter: "DiscordAdapter", channel: discord.abc.Messageable, reply_to: Optional[int], resume: Sequence[int] = ()
    ) -> None:
        super().__init__(adapter.throttle, getattr(channel, "id", None), resume)  # type: ignore[arg-type]
        self.channel = channel
        self.reply_to = reply_to
        self._sent: dict[int, discord.Message] = {}
        self._controls_on: dict[int, Optional[tuple[Control, ...]]] = {int(i): None for i in resume}
        self._last_index = 0  # the index of the last message of the render in progress

    def split(self, text: str) -> list[str]:
        chunks = split_markdown(text, MAX_LENGTH)
        self._last_index = sum(1 for chunk in chunks if chunk.strip()) - 1  # the base shows the non-blank ones
        return chunks

    def _controls_for(self, index: int) -> tuple[Control, ...]:
        return self.controls if index == self._last_index and self.job_id is not None else ()

    async def send(self, chunk: str, index: int) -> int:
        target = self.reply_to if index == 0 else self.messages[-1][0]
        reference = (
            discord.MessageReference(message_id=int(target), channel_id=self.channel.id, fail_if_not_exists=False)
            if target
            else None
        )
        controls = self._controls_for(index)
        extra = {"view": view} if (view := controls_view(self.job_id, controls)) is not None else {}
        message = await self.channel.send(
            chunk, reference=reference, allowed_mentions=NO_PINGS, mention_author=False, **extra
        )
        self._sent[message.id] = message
        self._controls_on[message.id] = controls
        await self._clear_all_but(message.id)
        return message.id

    async def edit(self, message_id: object, chunk: str) -> None:
        message_id = int(message_id)  # type: ignore[call-overload]
        shown = [int(i) for i, _ in self.messages]
        controls = self._controls_for(shown.index(message_id)) if message_id in shown else ()
        message = self._sent.get(message_id) or self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
        view = controls_view(self.job_id, controls)
        self._sent[message_id] = await message.edit(content=chunk, allowed_mentions=NO_PINGS, view=view)
        self._controls_on[message_id] = controls

    async def finish(self, text: str) -> list[str]:
        ids = await super().finish(text)
        await self._settle_controls()
        return ids

    async def fail(self, notice: str) -> None:
        self.controls = ()
        await super().fail(notice)
        await self._settle_controls()

    async def _settle_controls(self) -> None:
        """The final buttons on the last message, none elsewhere (best effort: the text is shown)."""
        if not self.messages:
            return
        last = int(self.messages[-1][0])  # type: ignore[call-overload]
        if self._controls_on.get(last) != self.controls:
            view = controls_view(self.job_id, self.controls)
            message = self._sent.get(last) or self.channel.get_partial_message(last)  # type: ignore[attr-defined]
            try:
                self._sent[last] = await self._retrying(lambda: message.edit(view=view))
                self._controls_on[last] = self.controls
            except Exception as exc:  # noqa: BLE001 - the text is shown; the buttons are extra
                log.warning("could not put the buttons on a finished reply (%s: %s)", type(exc).__name__, exc)
        await self._clear_all_but(last)

    async def _clear_all_but(self, keep: int) -> None:
        for message_id, controls in list(self._controls_on.items()):
            if message_id == keep or controls == ():
                continue
            message = self._sent.get(message_id) or self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
            try:
                self._sent[message_id] = await message.edit(view=None)
            except discord.NotFound:
                pass
            except Exception as exc:  # noqa: BLE001 - best effort: a failure here must not resend the text
                log.info("could not remove the buttons of an earlier reply message (%s: %s)", type(exc).__name__, exc)
                continue
            self._controls_on[message_id] = ()


class _Client(discord.Client):
    """discord.py's client, with Parley's adapter behind its events."""

    def __init__(self, adapter: "DiscordAdapter", **options: object) -> None:
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable "Message Content Intent" in the portal
        super().__init__(intents=intents, allowed_mentions=NO_PINGS, **options)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)
        self.ready = asyncio.Event()

    async def setup_hook(self) -> None:
        self.add_dynamic_items(ControlButton)  # presses on buttons sent before a restart too
        self.adapter._register_commands(self.tree)
        await self.adapter._sync_commands(self.tree)

    async def on_ready(self) -> None:
        # After IDENTIFY only (a start, or a session that could not resume; RESUME replays what
        # was missed, IDENTIFY does not): read back what was sent meanwhile.
        log.info("Discord: connected as %s (%s) in %d server(s)", self.user, self.user.id, len(self.guilds))
        self.ready.set()
        self.adapter._catch_up_soon()

    # discord.py runs every event handler as its own task. Taking the channel's lock before the
    # first await keeps one channel's creates, edits and deletes in gateway order (asyncio runs
    # new tasks first-in first-out, and its locks are fair).

    async def on_message(self, message: discord.Message) -> None:
        async with self.adapter.channel_lock(message.channel.id):
            await self.adapter._on_message(message)

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        async with self.adapter.channel_lock(payload.channel_id):
            await self.adapter._on_edit(payload)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        async with self.adapter.channel_lock(payload.channel_id):
            await self.adapter._on_delete(payload)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        await self.adapter._on_component(interaction)

    async def on_error(self, event: str, *args: object, **kwargs: object) -> None:
        log.exception("error in the Discord event handler for %s", event)


class _ChannelLock:
    """A channel's lock, and how many event handlers hold it or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0



def _is_export(text: str) -> bool:
    command = parse_command(text)
    return command is not None and command.name == "export"


class DiscordAdapter(DiscordCommands, DiscordControls, DiscordCatchUp, Adapter):
    """Parley on Discord. Build with `from_config`; the token is read from the environment."""

    platform = "discord"
    max_message_length = MAX_LENGTH
    supports_controls = True

    def __init__(self, config: "DiscordSettings", token: str, *, bot_name: str = "Parley", **client_options: object) -> None:
        self.config = config
        self.edit_interval = config.edit_interval
        self.bot_name = bot_name
        self.throttle = EditThrottle(config.edit_interval)
        self._token = token
        self._client_options = client_options
        self.client: Optional[_Client] = None
        self.core: Optional[Core] = None
        self._task: Optional[asyncio.Task] = None
        self._lease: Optional[LeaseKeeper] = None
        self._background: set[asyncio.Task] = set()
        self._channel_locks: dict[int, _ChannelLock] = {}
        self._catching_up: Optional[asyncio.Task] = None
        self.catch_up_runs = 0
        """How many times a fresh gateway session started a catch-up."""
        self.caught_up = asyncio.Event()
        """Set when the latest catch-up has ended."""

    @contextlib.asynccontextmanager
    async def channel_lock(self, channel_id: int) -> AsyncIterator[None]:
        """Hold one channel's lock. Handlers get it in the order they asked (the first wait comes
        before any other await); it is dropped once nobody holds or waits for it."""
        entry = self._channel_locks.get(channel_id)
        if entry is None:
            entry = self._channel_locks[channel_id] = _ChannelLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._channel_locks[channel_id]

    @property
    def connected(self) -> bool:
        """The gateway session is ready and not closed; a standby (another process holds the
        gateway lease) counts as connected: it is ready to take over."""
        lease = getattr(self, "_lease", None)
        if lease is not None and not lease.held:
            return True
        client = self.client
        return client is not None and client.is_ready() and not client.is_closed()

    @classmethod
    def from_config(cls, settings: "Settings", **client_options: object) -> "DiscordAdapter":
        token = settings.secret("discord", "token_env", settings.discord.token_env)
        return cls(settings.discord, token, bot_name=settings.bot.name, **client_options)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, core: Core) -> None:
        self.core = core
        client = _Client(self, **self._client_options)
        self.client = client
        lease = None
        if getattr(core, "lease", None) is not None:
            # One gateway session per token: processes sharing the database connect in turn, by
            # lease; every one of them logs in over HTTP, so each sends replies and runs jobs.
            lease = self._lease = LeaseKeeper(
                core, account_role(self.platform, self._token), self.config.lease_seconds, what="Discord gateway", log=log
            )
            self._task = asyncio.create_task(self._run_leased(client, lease), name="parley-discord")
        else:
            self._task = asyncio.create_task(client.start(self._token), name="parley-discord")
        ready = asyncio.ensure_future(client.ready.wait())
        answered = asyncio.ensure_future(lease.answered.wait()) if lease is not None else None
        waiting = {ready, self._task, *([answered] if answered else [])}
        deadline = asyncio.get_running_loop().time() + self.config.ready_timeout
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                done, _ = await asyncio.wait(waiting, timeout=max(remaining, 0), return_when=asyncio.FIRST_COMPLETED)
                if answered is not None and answered in done and ready not in done and self._task not in done:
                    waiting.discard(answered)
                    if not lease.held:  # logged in; another process holds the gateway: standby
                        break
                    continue  # connecting: wait for READY
                break
        finally:
            ready.cancel()
            if answered is not None:
                answered.cancel()
        if lease is not None and lease.answered.is_set() and not lease.held and not self._task.done():
            core.set_bot_username(self.platform, client.user.name)
            return
        if self._task.done():
            error = self._task.exception()
            await self.stop()
            if isinstance(error, discord.LoginFailure):
                raise AdapterError(f"Discord rejected the bot token in ${self.config.token_env}; reset it in the Developer Portal and copy it again") from None
            if isinstance(error, discord.PrivilegedIntentsRequired):
                raise AdapterError("Discord refused the Message Content intent: enable it under Bot → Privileged Gateway Intents in the Developer Portal") from None
            raise AdapterError(f"could not connect to Discord: {error}") from None
        if not client.ready.is_set():
            await self.stop()
            raise AdapterError(f"Discord did not become ready within {self.config.ready_timeout:g} s; raise [discord] ready_timeout or check the network")
        core.set_bot_username(self.platform, client.user.name)

    async def _run_leased(self, client: _Client, lease: LeaseKeeper) -> None:
        await client.login(self._token)  # HTTP only: enough to send replies
        await lease.run(lambda: self._gateway(client))

    async def _gateway(self, client: _Client) -> None:
        """The gateway session, while this process holds the token's lease."""
        try:
            await client.connect(reconnect=True)
        finally:
            client.ready.clear()
            client._ready.clear()  # discord.py's own flag behind is_ready()
            if client.ws is not None and not client.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.shield(client.ws.close(code=1000))

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        lease, self._lease = getattr(self, "_lease", None), None
        if lease is not None and self._task is not None:
            self._task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
            self._task = None
            await lease.release()
        client, self.client = self.client, None
        if client is not None:
            await client.close()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
            self._task = None

    # -- replies ---------------------------------------------------------------------------------

    async def open_reply(
        self, conversation: ConversationKey, reply_to: Optional[str], resume: Sequence[str] = ()
    ) -> ReplyStream:
        channel = await self._channel(int(conversation.key))
        reply = int(reply_to) if reply_to and reply_to.isdigit() else None
        return _DiscordStream(self, channel, reply, [int(i) for i in resume if i.isdigit()])

    async def _channel(self, channel_id: int) -> discord.abc.Messageable:
        if self.client is None:
            raise AdapterError("the Discord adapter is not running")
        channel = self.client.get_channel(channel_id)
        if channel is None:
            channel = await self.client.fetch_channel(channel_id)
        return channel  # type: ignore[return-value]

    # -- messages --------------------------------------------------------------------------------

    def _conversation(self, channel_id: int) -> ConversationKey:
        return ConversationKey(self.platform, str(channel_id))

    def _is_admin(self, user: object, permissions: Optional[discord.Permissions], direct: bool) -> bool:
        """In a DM the user; in a server Manage Server, Administrator, a configured role or user."""
        if direct or getattr(user, "id", None) in self.config.admin_user_ids:
            return True
        if permissions is not None and (permissions.manage_guild or permissions.administrator):
            return True
        return any(role.id in self.config.admin_role_ids for role in getattr(user, "roles", ()))

    def _answers_everything_in(self, channel: object) -> bool:
        ids = {getattr(channel, "id", None), getattr(channel, "parent_id", None)}
        return bool(ids & set(self.config.channel_ids))

    def _strip_mention(self, text: str) -> str:
        assert self.client is not None and self.client.user is not None
        return re.sub(rf"<@!?{self.client.user.id}>", "", text).strip()

    async def _replies_to_bot(self, message: discord.Message) -> bool:
        reference = message.reference
        if reference is None or reference.message_id is None or self.client is None:
            return False
        resolved = reference.resolved
        if not isinstance(resolved, discord.Message):
            resolved = reference.cached_message
        if resolved is None:
            try:
                resolved = await message.channel.fetch_message(reference.message_id)
            except discord.HTTPException:
                return False
        return resolved.author.id == self.client.user.id

    async def _on_message(self, message: discord.Message, *, may_answer: bool = True) -> Optional[Outcome]:
        """Hand a message to the core; `may_answer=False` keeps it as context whoever it is for."""
        if self.core is None or self.client is None or message.author.bot or message.webhook_id is not None:
            return None  # bots, itself included, and webhooks are not people
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return None
        direct = message.guild is None
        text = message.content or ""
        if not text.strip():
            if may_answer and direct and (message.attachments or message.stickers):
                await message.reply(TEXT_ONLY, allowed_mentions=NO_PINGS, mention_author=False)
            return None
        mentioned = self.client.user in message.mentions
        if mentioned:
            text = self._strip_mention(text) or text
        addressed = may_answer and (
            direct or mentioned or self._answers_everything_in(message.channel) or await self._replies_to_bot(message)
        )
        if addressed and not direct and _is_export(text):  # the channel would see the file
            await message.reply(messages.EXPORT_IN_PRIVATE, allowed_mentions=NO_PINGS, mention_author=False)
            return None
        permissions = None if direct else message.channel.permissions_for(message.author)  # type: ignore[arg-type]
        incoming = IncomingMessage(
            conversation=self._conversation(message.channel.id),
            message_id=str(message.id),
            author=Author(
                id=str(message.author.id),
                name=message.author.display_name,
                is_admin=self._is_admin(message.author, permissions, direct),
            ),
            text=text,
            is_direct=direct,
            addressed=addressed,
            reply_to=str(message.reference.message_id) if message.reference and message.reference.message_id else None,
            sent_at=message.created_at,
        )
        result = await self.core.handle(incoming)
        if result.attachment is not None and direct:
            await message.reply(
                result.reply or None, file=attachment_file(result.attachment), allowed_mentions=NO_PINGS, mention_author=False
            )
        elif result.reply:
            stream = _DiscordStream(self, message.channel, message.id)
            await stream.finish(result.reply)
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            self._in_background(self._typing_until_done(message.channel, result.job_id))
        return result.outcome

    def _in_background(self, work: Any, name: Optional[str] = None) -> asyncio.Task:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _typing_until_done(self, channel: discord.abc.Messageable, job_id: int) -> None:
        assert self.core is not None
        try:
            async with channel.typing():  # re-sent by discord.py every few seconds until the block ends
                await self.core.wait_for(job_id)
        except discord.HTTPException as exc:
            log.debug("typing indicator failed: %s", exc)
            await self.core.wait_for(job_id)

    async def _on_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data = payload.data
        author = data.get("author") or {}
        if self.core is None or author.get("bot") or "content" not in data:
            return
        text = data["content"]
        if self.client is not None and self.client.user is not None:
            text = self._strip_mention(text) or text
        await self.core.handle_edit(
            IncomingMessage(
                conversation=self._conversation(payload.channel_id),
                message_id=str(payload.message_id),
                author=Author(id=str(author.get("id", "")), name=author.get("username", "")),
                text=text,
                is_direct=payload.guild_id is None,
                addressed=False,
            )
        )

    async def _on_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if self.core is not None:
            await self.core.handle_delete(self._conversation(payload.channel_id), str(payload.message_id))

    # -- slash commands (`adapters.discord_commands`) ----------------------------------------------

    def _answer_within(self) -> float:
        return ANSWER_WITHIN  # read when a command runs, so that it can be changed at run time

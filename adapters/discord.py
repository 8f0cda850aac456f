"""Discord, through discord.py 2 (`client.start()` inside Parley's own event loop, never
`client.run()`, which owns the loop).

One conversation per channel; a thread is its own conversation, and so is a DM. In DMs the bot
answers every message; in a server, when mentioned, when a message replies to one of its
messages, or any message in a configured channel. Admins steer it with slash commands. Every
message the bot sends carries `allowed_mentions` that ping nobody. No discord.py object passes
this module's edge.
"""

# No `from __future__ import annotations` here: discord.py reads the slash commands' parameter
# annotations at runtime.

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands

from bot.conversation import COMMANDS, Access, Argument, Command, messages
from bot.core.contracts import Outcome
from bot.core.errors import AdapterError
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Adapter, Core, EditingReplyStream, EditThrottle, ReplyStream, split_markdown

if TYPE_CHECKING:
    from bot.core.config import DiscordSettings, Settings

__all__ = ["DiscordAdapter"]

log = logging.getLogger("parley.discord")

MAX_LENGTH = 2000
TEXT_ONLY = messages.TEXT_ONLY
NO_PINGS = discord.AllowedMentions.none()
ANSWER_WITHIN = 2.0  # Discord wants an interaction answered within 3 s; past this, defer first
ADMIN_PERMISSIONS = discord.Permissions(manage_guild=True)
"""Commands for admins are hidden from others by default (server settings can change that)."""


def _option_annotation(argument: Argument) -> Any:
    """The annotation discord.py reads an option's type, range and requiredness from."""
    kind: Any = argument.type
    if argument.minimum is not None or argument.maximum is not None:
        bound = int if kind is int else float
        low = None if argument.minimum is None else bound(argument.minimum)
        high = None if argument.maximum is None else bound(argument.maximum)
        kind = app_commands.Range[kind, low, high]
    return kind if argument.required else Optional[kind]


def _slash_callback(adapter: "DiscordAdapter", command: Command, variant: Optional[str], arguments: Sequence[Argument]):  # noqa: ANN202
    """A callback whose signature declares `arguments` as options; it runs the command's text form."""

    async def callback(interaction: discord.Interaction, **values: Any) -> None:
        await adapter._run_command(interaction, command.text_for(variant, values))

    interaction = inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction)
    options = [
        inspect.Parameter(
            a.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=_option_annotation(a),
            default=inspect.Parameter.empty if a.required else None,
        )
        for a in arguments
    ]
    callback.__signature__ = inspect.Signature([interaction, *options])  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = {a.name: a.description for a in arguments}  # type: ignore[attr-defined]
    return callback


def _slash_command(adapter: "DiscordAdapter", command: Command) -> "app_commands.Command | app_commands.Group":
    """One declaration → a slash command, or a group of sub-commands for a command with variants."""
    admin_only = ADMIN_PERMISSIONS if command.access is not Access.EVERYONE else None
    if command.variants:
        group = app_commands.Group(name=command.name, description=command.short_description, default_permissions=admin_only)
        for variant in command.variants:
            callback = _slash_callback(adapter, command, variant.name, variant.arguments)
            group.add_command(app_commands.Command(name=variant.name, description=variant.description, callback=callback))
        return group
    callback = _slash_callback(adapter, command, None, command.arguments)
    slash = app_commands.Command(name=command.name, description=command.short_description, callback=callback)
    slash.default_permissions = admin_only
    return slash


class _DiscordStream(EditingReplyStream):
    def __init__(
        self, adapter: "DiscordAdapter", channel: discord.abc.Messageable, reply_to: Optional[int], resume: Sequence[int] = ()
    ) -> None:
        super().__init__(adapter.throttle, getattr(channel, "id", None), resume)  # type: ignore[arg-type]
        self.channel = channel
        self.reply_to = reply_to
        self._sent: dict[int, discord.Message] = {}

    def split(self, text: str) -> list[str]:
        return split_markdown(text, MAX_LENGTH)

    async def send(self, chunk: str, index: int) -> int:
        target = self.reply_to if index == 0 else self.messages[-1][0]
        reference = (
            discord.MessageReference(message_id=int(target), channel_id=self.channel.id, fail_if_not_exists=False)
            if target
            else None
        )
        message = await self.channel.send(chunk, reference=reference, allowed_mentions=NO_PINGS, mention_author=False)
        self._sent[message.id] = message
        return message.id

    async def edit(self, message_id: object, chunk: str) -> None:
        message_id = int(message_id)  # type: ignore[call-overload]
        message = self._sent.get(message_id) or self.channel.get_partial_message(message_id)  # type: ignore[attr-defined]
        self._sent[message_id] = await message.edit(content=chunk, allowed_mentions=NO_PINGS)


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
        self.adapter._register_commands(self.tree)
        await self.adapter._sync_commands(self.tree)

    async def on_ready(self) -> None:
        log.info("Discord: connected as %s (%s) in %d server(s)", self.user, self.user.id, len(self.guilds))
        self.ready.set()

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

    async def on_error(self, event: str, *args: object, **kwargs: object) -> None:
        log.exception("error in the Discord event handler for %s", event)


class DiscordAdapter(Adapter):
    """Parley on Discord. Build with `from_config`; the token is read from the environment."""

    platform = "discord"
    max_message_length = MAX_LENGTH

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
        self._background: set[asyncio.Task] = set()
        self._channel_locks: dict[int, asyncio.Lock] = {}

    def channel_lock(self, channel_id: int) -> asyncio.Lock:
        return self._channel_locks.setdefault(channel_id, asyncio.Lock())

    @classmethod
    def from_config(cls, settings: "Settings", **client_options: object) -> "DiscordAdapter":
        token = settings.secret("discord", "token_env", settings.discord.token_env)
        return cls(settings.discord, token, bot_name=settings.bot.name, **client_options)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, core: Core) -> None:
        self.core = core
        client = _Client(self, **self._client_options)
        self.client = client
        self._task = asyncio.create_task(client.start(self._token), name="parley-discord")
        ready = asyncio.ensure_future(client.ready.wait())
        try:
            await asyncio.wait({ready, self._task}, timeout=self.config.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
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

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
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

    async def _on_message(self, message: discord.Message) -> None:
        if self.core is None or self.client is None or message.author.bot or message.webhook_id is not None:
            return  # bots, itself included, and webhooks are not people
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        direct = message.guild is None
        text = message.content or ""
        if not text.strip():
            if direct and (message.attachments or message.stickers):
                await message.reply(TEXT_ONLY, allowed_mentions=NO_PINGS, mention_author=False)
            return
        mentioned = self.client.user in message.mentions
        if mentioned:
            text = self._strip_mention(text) or text
        addressed = direct or mentioned or self._answers_everything_in(message.channel) or await self._replies_to_bot(message)
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
        if result.reply:
            stream = _DiscordStream(self, message.channel, message.id)
            await stream.finish(result.reply)
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            task = asyncio.create_task(self._typing_until_done(message.channel, result.job_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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

    # -- slash commands --------------------------------------------------------------------------

    def _register_commands(self, tree: app_commands.CommandTree) -> None:
        """The slash tree, generated from the core's command declarations (`bot.conversation.COMMANDS`)."""
        for command in COMMANDS:
            tree.add_command(_slash_command(self, command))
        assert {c.name for c in tree.get_commands()} == set(COMMANDS.names())

    async def _sync_commands(self, tree: app_commands.CommandTree) -> None:
        try:
            if self.config.guild_ids:
                for guild_id in self.config.guild_ids:
                    guild = discord.Object(id=guild_id)
                    tree.copy_global_to(guild=guild)
                    await tree.sync(guild=guild)
                log.info("Discord: slash commands registered in %d server(s)", len(self.config.guild_ids))
            else:
                await tree.sync()
                log.info("Discord: slash commands registered globally (they can take up to an hour to appear)")
        except discord.HTTPException as exc:
            log.error("Discord: could not register the slash commands: %s", exc)

    async def _run_command(self, interaction: discord.Interaction, text: str) -> None:
        """Run a slash command through the core; answer at once, or defer if that takes long."""
        assert self.core is not None
        direct = interaction.guild_id is None
        incoming = IncomingMessage(
            conversation=self._conversation(interaction.channel_id),
            message_id=f"interaction-{interaction.id}",
            author=Author(
                id=str(interaction.user.id),
                name=interaction.user.display_name,
                is_admin=self._is_admin(interaction.user, interaction.permissions, direct),
            ),
            text=text.strip(),
            is_direct=direct,
            addressed=True,
        )
        task = asyncio.ensure_future(self.core.handle(incoming))
        done, _ = await asyncio.wait({task}, timeout=ANSWER_WITHIN)
        deferred = not done
        if deferred:
            await interaction.response.defer(ephemeral=True, thinking=True)
        result = await task
        reply = result.reply or "Done."
        private = result.private or result.outcome is Outcome.ERROR
        chunks = split_markdown(reply, MAX_LENGTH)
        if deferred:
            for chunk in chunks:
                await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_PINGS)
            return
        await interaction.response.send_message(chunks[0], ephemeral=private, allowed_mentions=NO_PINGS)
        for chunk in chunks[1:]:
            await interaction.followup.send(chunk, ephemeral=private, allowed_mentions=NO_PINGS)

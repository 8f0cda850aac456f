"""Discord's slash commands: the tree generated from the core's command registry
(`bot.conversation.COMMANDS`), and running a slash command through the core: deferring when the
core is slow, answering privately (ephemeral) when the answer is the caller's alone, and sending
the file an /export answers with. `/help` answers with the slash syntax, generated from the same
registry (`slash_help_lines`). `DiscordAdapter` inherits `DiscordCommands`.

Only commands for admins alone (`Access.ADMINS`) carry Manage Server as their default permission,
which hides them from others. A command everyone may use to look (`/system`, `/set`) stays
visible: Discord cannot set default permissions per sub-command or per option, so the core's one
permission check refuses a non-admin's change, privately.

Also home to what both this module and `adapters.discord` send with (`MAX_LENGTH`, `NO_PINGS`,
`attachment_file`), since this module cannot import `adapters.discord`, which imports it.
"""

# No `from __future__ import annotations` here: discord.py reads the slash commands' parameter
# annotations at runtime.

import asyncio
import inspect
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import discord
from discord import app_commands

from bot.conversation import COMMANDS, Access, Argument, Command, messages, parse_command
from bot.core.contracts import Attachment, Outcome
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Core, split_markdown

if TYPE_CHECKING:
    from bot.core.config import DiscordSettings

log = logging.getLogger("parley.discord")

MAX_LENGTH = 2000
NO_PINGS = discord.AllowedMentions.none()
ADMIN_PERMISSIONS = discord.Permissions(manage_guild=True)
"""Commands for admins alone are hidden from others by default (server settings can change that)."""
HELP_COMMAND = "help"
"""The command whose answer Discord renders itself (`slash_help_lines`)."""
OPTION_KIND = {str: "text", int: "integer", float: "number"}
ADMINS_NOTE = " (admins in servers)"
CHANGES_NOTE = " (changes: admins in servers)"


def attachment_file(attachment: Attachment) -> discord.File:
    return discord.File(io.BytesIO(attachment.data), filename=attachment.filename)


def _option_annotation(argument: Argument) -> Any:
    """The annotation discord.py reads an option's type, range and requiredness from."""
    kind: Any = argument.type
    if argument.minimum is not None or argument.maximum is not None:
        bound = int if kind is int else float
        low = None if argument.minimum is None else bound(argument.minimum)
        high = None if argument.maximum is None else bound(argument.maximum)
        kind = app_commands.Range[kind, low, high]
    return kind if argument.required else Optional[kind]


def _option_syntax(argument: Argument) -> str:
    shown = f"{argument.name}:<{OPTION_KIND.get(argument.type, 'text')}>"
    return shown if argument.required else f"[{shown}]"


def _admin_note(command: Command, variant: Optional[str], arguments: Sequence[Argument]) -> str:
    if command.access is Access.ADMINS:
        return ADMINS_NOTE
    if command.access is Access.EVERYONE:
        return ""
    if variant is None:  # options are optional: without them it shows, with them it changes
        return CHANGES_NOTE if arguments else ""
    invocation = command.text_for(variant, {a.name: a.name for a in arguments})
    return ADMINS_NOTE if command.needs_admin(invocation[len(command.name) + 1 :]) else ""


def slash_help_lines(commands: Optional[Sequence[Command]] = None) -> list[str]:
    """/help's lines on Discord: each slash command (each sub-command) with its real options."""
    lines = []
    for command in COMMANDS if commands is None else commands:
        shapes = [(v.name, v.description, v.arguments) for v in command.variants]
        shapes = shapes or [(None, command.short_description, command.arguments)]
        for variant, description, arguments in shapes:
            words = [f"/{command.name}", *([variant] if variant else []), *map(_option_syntax, arguments)]
            lines.append(f"{' '.join(words)} — {description}{_admin_note(command, variant, arguments)}")
    return lines


def _slash_callback(adapter: "DiscordCommands", command: Command, variant: Optional[str], arguments: Sequence[Argument]):  # noqa: ANN202
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


def _slash_command(adapter: "DiscordCommands", command: Command) -> "app_commands.Command | app_commands.Group":
    """One declaration → a slash command, or a group of sub-commands for a command with variants."""
    admin_only = ADMIN_PERMISSIONS if command.access is Access.ADMINS else None
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


class DiscordCommands:
    """The slash-command half of `DiscordAdapter` (which provides the attributes declared here)."""

    config: "DiscordSettings"
    core: Optional[Core]
    bot_name: str

    def _conversation(self, channel_id: int) -> ConversationKey:
        raise NotImplementedError

    def _is_admin(self, user: object, permissions: Optional[discord.Permissions], direct: bool) -> bool:
        raise NotImplementedError

    def _answer_within(self) -> float:
        """Seconds a command may take before its interaction is deferred (`adapters.discord.ANSWER_WITHIN`)."""
        raise NotImplementedError

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
        done, _ = await asyncio.wait({task}, timeout=self._answer_within())
        deferred = not done
        if deferred:
            await interaction.response.defer(ephemeral=True, thinking=True)
        result = await task
        reply = result.reply or "Done."
        parsed = parse_command(text)
        if parsed is not None and parsed.name == HELP_COMMAND and result.outcome is Outcome.COMMAND and result.refusal is None:
            reply = messages.help_text(self.bot_name, slash_help_lines())
        private = result.private or result.outcome is Outcome.ERROR or result.attachment is not None
        chunks = split_markdown(reply, MAX_LENGTH)
        # A file (/export) goes with the first chunk, to the author alone.
        file = {"file": attachment_file(result.attachment)} if result.attachment is not None else {}
        if deferred:
            for chunk in chunks:
                await interaction.followup.send(chunk, ephemeral=True, allowed_mentions=NO_PINGS, **file)
                file = {}
            return
        await interaction.response.send_message(chunks[0], ephemeral=private, allowed_mentions=NO_PINGS, **file)
        for chunk in chunks[1:]:
            await interaction.followup.send(chunk, ephemeral=private, allowed_mentions=NO_PINGS)

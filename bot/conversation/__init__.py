"""Conversation logic: what Parley does with one incoming message.

This package owns the router (`Router`, the `Core` adapters call), the commands as a registry
(`COMMANDS`: one declaration per command feeds `/help`, the permission check, Telegram's menu and
Discord's slash tree), the per-user rate limit, turning a stored conversation into the chat the
model sees (`history`), and every sentence the core says to people (`messages`). It imports only
`bot.core`, `bot.generation` and, for type hints, `storage`; the job queue above it is reached
through `JobsPort`, which `bot.jobs.GenerationQueue` satisfies.
"""

from bot.conversation.commands import COMMANDS, parse_settings_args
from bot.conversation.context import CommandContext, ConversationDefaults, HealthPort, JobsPort
from bot.conversation.history import build_chat, effective_settings, effective_system_prompt
from bot.conversation.limits import UserRateLimit
from bot.conversation.registry import Access, Argument, Command, CommandRegistry, ParsedCommand, Variant, parse_command
from bot.conversation.router import Router

__all__ = [
    "Router",
    "COMMANDS",
    "Command",
    "CommandRegistry",
    "CommandContext",
    "Access",
    "Argument",
    "Variant",
    "ParsedCommand",
    "parse_command",
    "parse_settings_args",
    "JobsPort",
    "HealthPort",
    "ConversationDefaults",
    "UserRateLimit",
    "build_chat",
    "effective_settings",
    "effective_system_prompt",
]

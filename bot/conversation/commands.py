"""The commands every platform shares: parsing, permissions, and what each one does."""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.conversation.history import effective_settings, effective_system_prompt
from bot.core.types import SETTING_RANGES, IncomingMessage

if TYPE_CHECKING:
    from bot.conversation.router import Router

__all__ = ["COMMANDS", "ADMIN_COMMANDS", "ParsedCommand", "parse_command", "run_command", "parse_settings_args"]

MAX_SYSTEM_PROMPT = 4000
MAX_COMMAND_CHARS = MAX_SYSTEM_PROMPT + 100

HELP = {
    "help": "/help: this list",
    "reset": "/reset [new system prompt]: forget this conversation's history (admins in shared chats)",
    "system": "/system [text | clear | default]: show or set the system prompt (admins in shared chats)",
    "set": "/set key=value ...: temperature (0-2), top_p (0.01-1), max_new_tokens (1-4096), or key=default (admins in shared chats)",
    "status": "/status: model, queue, your place in it, history size and settings",
    "forget": "/forget: delete your own messages (and the replies to them) from this conversation",
}
COMMANDS = tuple(HELP)
ADMIN_COMMANDS = frozenset({"reset", "system", "set"})
_COMMAND_RE = re.compile(r"^/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?:\s+(.*))?$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str
    args: str


def parse_command(text: str, bot_username: str | None = None) -> ParsedCommand | None:
    """`/name args` or `/name@bot args`. None if the text is not a command, or is one addressed to
    another bot. The name is lower-cased; unknown names are returned too (the router answers them)."""
    match = _COMMAND_RE.match(text.strip())
    if not match:
        return None
    name, target, args = match.group(1).lower(), match.group(2), (match.group(3) or "").strip()
    if target and (bot_username is None or target.lower() != bot_username.lower()):
        return None
    return ParsedCommand(name, args)


def parse_settings_args(args: str) -> dict[str, float | int | None]:
    """`temperature=0.7 top_p=0.9` → values, checked against SETTING_RANGES. `key=default` gives None.
    Raises ValueError with a message for the user naming the bad key and what is allowed."""
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    if not words:
        raise ValueError("nothing to set")
    values: dict[str, float | int | None] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        key = key.strip().lower()
        if not sep or not raw.strip():
            raise ValueError(f"{word!r} is not key=value")
        if key not in SETTING_RANGES:
            raise ValueError(f"unknown setting {key!r}; use {', '.join(SETTING_RANGES)}")
        kind, low, high = SETTING_RANGES[key]
        raw = raw.strip()
        if raw.lower() == "default":
            values[key] = None
            continue
        try:
            number = kind(raw) if kind is float else int(raw)
        except ValueError:
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from None
        if kind is float and number != number:  # NaN
            raise ValueError(f"{key} must be a number, not {raw!r}")
        if not low <= number <= high:
            raise ValueError(f"{key} must be between {low:g} and {high:g}, not {raw}")
        values[key] = number
    return values


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


Handler = Callable[["Router", IncomingMessage, str], Awaitable[str]]


async def _help(router: Router, message: IncomingMessage, args: str) -> str:
    lines = [f"{router.settings.bot.name} answers your messages with a local language model. Commands:"]
    lines += [HELP[name] for name in COMMANDS]
    return "\n".join(lines)


async def _reset(router: Router, message: IncomingMessage, args: str) -> str:
    conversation = await router.conversation_for(message)
    new_prompt = args.strip() or None
    if new_prompt is not None and len(new_prompt) > MAX_SYSTEM_PROMPT:
        return f"That system prompt is too long ({len(new_prompt)} characters; the limit is {MAX_SYSTEM_PROMPT})."
    archived, cancelled = await router.queue.reset(conversation.id, system_prompt=new_prompt)
    await router.audit(message, conversation.id, "reset", f"archived={archived} cancelled={cancelled}" + (f" system={new_prompt!r}" if new_prompt else ""))
    reply = f"History cleared ({archived} message{'s' if archived != 1 else ''} forgotten"
    reply += f", {cancelled} pending repl{'ies' if cancelled != 1 else 'y'} cancelled)." if cancelled else ")."
    if new_prompt:
        reply += f"\nNew system prompt: {_clip(new_prompt)}"
    return reply


async def _system(router: Router, message: IncomingMessage, args: str) -> str:
    conversation = await router.conversation_for(message)
    text = args.strip()
    if not text:
        current = effective_system_prompt(conversation, router.settings.bot.system_prompt)
        origin = "default" if conversation.system_prompt is None else "set for this conversation"
        return f"System prompt ({origin}): {_clip(current)}" if current else "There is no system prompt."
    if not router.may_administer(message):
        return router.refusal("system")
    if text.lower() == "clear":
        value, answer = "", "System prompt cleared: the model gets none."
    elif text.lower() == "default":
        value, answer = None, "System prompt back to the default."
    elif len(text) > MAX_SYSTEM_PROMPT:
        return f"That system prompt is too long ({len(text)} characters; the limit is {MAX_SYSTEM_PROMPT})."
    else:
        value, answer = text, f"System prompt set: {_clip(text)}"
    await router.repo.set_system_prompt(conversation.id, value)
    await router.audit(message, conversation.id, "system", repr(value))
    return answer


async def _set(router: Router, message: IncomingMessage, args: str) -> str:
    conversation = await router.conversation_for(message)
    if not args.strip():
        current = effective_settings(conversation, router.settings.generation)
        return "Settings: " + ", ".join(f"{k}={v}" for k, v in current.to_dict().items()) + "\n" + HELP["set"]
    if not router.may_administer(message):
        return router.refusal("set")
    try:
        values = parse_settings_args(args)
    except ValueError as exc:
        return f"Nothing changed: {exc}.\n{HELP['set']}"
    await router.repo.set_generation(conversation.id, **values)
    await router.audit(message, conversation.id, "set", " ".join(f"{k}={v}" for k, v in values.items()))
    updated = effective_settings(await router.repo.get_conversation(conversation.id), router.settings.generation)
    return "Settings now: " + ", ".join(f"{k}={v}" for k, v in updated.to_dict().items())


async def _status(router: Router, message: IncomingMessage, args: str) -> str:
    conversation = await router.conversation_for(message)
    health = await router.client.health()
    info = health.model
    if info is None:
        model_line = "Model: loading…" if health.alive else "Model: not running"
    else:
        model_line = f"Model: {info.name} ({info.quantization}, {info.dtype}, on {info.device}, context {info.context_window} tokens)"
    if health.restarts:
        model_line += f"; worker restarted {health.restarts} time{'s' if health.restarts != 1 else ''}"
    depth = await router.queue.depth()
    position = await router.queue.position_for_author(conversation.id, message.author.id)
    queue_line = f"Queue: {depth} waiting or running"
    queue_line += f"; your next reply is number {position}" if position else "; nothing of yours waiting"
    history = await router.repo.history(conversation.id)
    current = effective_settings(conversation, router.settings.generation)
    system = effective_system_prompt(conversation, router.settings.bot.system_prompt)
    return "\n".join(
        [
            model_line,
            queue_line,
            f"History: {len(history)} message{'s' if len(history) != 1 else ''}",
            "Settings: " + ", ".join(f"{k}={v}" for k, v in current.to_dict().items()),
            f"System prompt: {_clip(system, 120) if system else '(none)'}",
        ]
    )


async def _forget(router: Router, message: IncomingMessage, args: str) -> str:
    conversation = await router.conversation_for(message)
    archived, cancelled = await router.queue.forget(conversation.id, message.author.id)
    await router.audit(message, conversation.id, "forget", f"archived={archived} cancelled={cancelled}")
    if not archived and not cancelled:
        return "There was nothing of yours to forget here."
    reply = f"Forgot {archived} message{'s' if archived != 1 else ''} (yours and the replies to them)"
    return reply + (f"; {cancelled} waiting repl{'ies' if cancelled != 1 else 'y'} cancelled." if cancelled else ".")


HANDLERS: dict[str, Handler] = {
    "help": _help,
    "reset": _reset,
    "system": _system,
    "set": _set,
    "status": _status,
    "forget": _forget,
}


async def run_command(router: Router, message: IncomingMessage, command: ParsedCommand) -> str:
    """Run a command for `message` and return the answer to show its author."""
    handler = HANDLERS.get(command.name)
    if handler is None:
        return f"Unknown command /{command.name}. Try /help."
    # /system and /set without arguments only show; they check permission themselves when changing.
    if command.name == "reset" and not router.may_administer(message):
        return router.refusal(command.name)
    return await handler(router, message, command.args)

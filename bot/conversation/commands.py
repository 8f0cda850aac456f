"""The commands every platform shares: one declaration each, on its handler.

`COMMANDS` is the registry `/help`, the permission check, Telegram's menu and Discord's slash
tree are generated from; a new command is one `@COMMANDS.command(...)` on its handler here (and
its sentences in `bot.conversation.messages`). Handlers get a `CommandContext`; admin commands are
checked by the registry before their handler runs. A change writes its own audit row, in its
transaction (storage does, for the update the router says is being handled).
"""

from __future__ import annotations

import json
import shlex
from datetime import datetime, timedelta, timezone

from bot.conversation import messages
from bot.conversation.context import CommandContext
from bot.conversation.registry import Access, Argument, CommandRegistry, Variant
from bot.core.contracts import Attachment, Outcome, RouteResult
from bot.core.types import SETTING_RANGES

__all__ = [
    "COMMANDS",
    "MAX_SYSTEM_PROMPT",
    "MAX_COMMAND_CHARS",
    "AUDIT_SHOWN",
    "EXPORT_EVERY",
    "MAX_EXPORT_BYTES",
    "parse_settings_args",
]

MAX_SYSTEM_PROMPT = 4000
MAX_COMMAND_CHARS = MAX_SYSTEM_PROMPT + 100
AUDIT_SHOWN = 10
"""/audit lists this many of the newest admin actions."""
EXPORT_EVERY = timedelta(minutes=10)
"""/export: once per user (per platform) this often; the audit trail holds the last one, so the
limit holds across bot processes and restarts."""
MAX_EXPORT_BYTES = 1_000_000
"""/export's file at most; beyond it, the newest messages that fit."""
EXPORT_ACTION = "export"

COMMANDS = CommandRegistry()


def parse_settings_args(args: str) -> dict[str, float | int | None]:
    """`temperature=0.7 top_p=0.9` → values, checked against SETTING_RANGES. `key=default` gives None.
    Raises ValueError with a message for the user naming the bad key and what is allowed."""
    problem = messages.SettingProblem
    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    if not words:
        raise ValueError(problem.NOTHING)
    values: dict[str, float | int | None] = {}
    for word in words:
        key, sep, raw = word.partition("=")
        key = key.strip().lower()
        if not sep or not raw.strip():
            raise ValueError(problem.not_key_value(word))
        if key not in SETTING_RANGES:
            raise ValueError(problem.unknown(key, list(SETTING_RANGES)))
        kind, low, high = SETTING_RANGES[key]
        raw = raw.strip()
        if raw.lower() == "default":
            values[key] = None
            continue
        try:
            number = kind(raw) if kind is float else int(raw)
        except ValueError:
            raise ValueError(problem.not_a_number(key, raw, integer=kind is int)) from None
        if kind is float and number != number:  # NaN
            raise ValueError(problem.not_a_number(key, raw, integer=False))
        if not low <= number <= high:
            raise ValueError(problem.out_of_range(key, low, high, raw))
        values[key] = number
    return values


def _setting_argument(key: str) -> Argument:
    kind, low, high = SETTING_RANGES[key]
    description = f"{low:g} to {high:g}" + ("; 0 is greedy" if key == "temperature" else "")
    return Argument(key, description, kind, minimum=low, maximum=high, keyword=True)


_SETTINGS_HELP = ", ".join(f"{key} ({low:g}-{high:g})" for key, (_, low, high) in SETTING_RANGES.items())


@COMMANDS.command("help", "this list", private=True)
async def _help(context: CommandContext, args: str) -> str:
    return messages.help_text(context.defaults.bot_name, COMMANDS.help_lines())


@COMMANDS.command(
    "reset",
    "forget this conversation's history (admins in shared chats)",
    usage="[new system prompt]",
    summary="Forget this conversation's history (optionally set a new system prompt)",
    access=Access.ADMINS,
    arguments=(Argument("system_prompt", "A new system prompt for this conversation"),),
)
async def _reset(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    new_prompt = args.strip() or None
    if new_prompt is not None and len(new_prompt) > MAX_SYSTEM_PROMPT:
        return messages.system_prompt_too_long(len(new_prompt), MAX_SYSTEM_PROMPT)
    archived, cancelled = await context.jobs.reset(conversation.id, system_prompt=new_prompt)
    return messages.history_cleared(archived, cancelled, new_prompt)


@COMMANDS.command(
    "system",
    "show or set the system prompt (admins in shared chats)",
    usage="[text | clear | default]",
    summary="Show or change this conversation's system prompt",
    access=Access.ADMINS_TO_CHANGE,
    variants=(
        Variant("show", "Show the system prompt"),
        Variant("set", "Set the system prompt", arguments=(Argument("text", "The new system prompt", required=True),)),
        Variant("clear", "Remove the system prompt", words="clear"),
        Variant("default", "Go back to the configured system prompt", words="default"),
    ),
)
async def _system(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    text = args.strip()
    if not text:
        current = context.system_prompt_of(conversation)
        return messages.system_prompt_shown(current, is_default=conversation.system_prompt is None)
    if text.lower() == "clear":
        value, answer = "", messages.SYSTEM_PROMPT_CLEARED
    elif text.lower() == "default":
        value, answer = None, messages.SYSTEM_PROMPT_DEFAULT
    elif len(text) > MAX_SYSTEM_PROMPT:
        return messages.system_prompt_too_long(len(text), MAX_SYSTEM_PROMPT)
    else:
        value, answer = text, messages.system_prompt_set(text)
    await context.repo.set_system_prompt(conversation.id, value)
    return answer


@COMMANDS.command(
    "set",
    f"{_SETTINGS_HELP}, or key=default (admins in shared chats)",
    usage="key=value ...",
    summary="Change this conversation's generation settings",
    access=Access.ADMINS_TO_CHANGE,
    arguments=tuple(_setting_argument(key) for key in SETTING_RANGES),
)
async def _set(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    usage = context.command.help_line if context.command else ""
    if not args.strip():
        return messages.settings_shown(context.settings_of(conversation), usage)
    try:
        values = parse_settings_args(args)
    except ValueError as exc:
        return messages.nothing_changed(str(exc), usage)
    await context.repo.set_generation(conversation.id, **values)
    return messages.settings_now(context.settings_of(await context.repo.get_conversation(conversation.id)))


@COMMANDS.command("status", "model, queue, your place in it, history size and settings", private=True)
async def _status(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    health = await context.health()
    depth = await context.jobs.depth()
    position = await context.jobs.position_for_author(conversation.id, context.message.author.id)
    history = await context.repo.history(conversation.id)
    return messages.status_report(
        health, depth, position, len(history), context.settings_of(conversation), context.system_prompt_of(conversation)
    )


@COMMANDS.command("model", "the model, how it runs, and this conversation's generation settings", private=True)
async def _model(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    return messages.model_report(await context.health(), context.settings_of(conversation))


@COMMANDS.command(
    "forget",
    "delete your own messages (and the replies to them) from this conversation",
    summary="Delete your own messages (and the replies to them) from this conversation",
    private=True,
)
async def _forget(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    archived, cancelled = await context.jobs.forget(conversation.id, context.message.author.id)
    return messages.forgot(archived, cancelled)


@COMMANDS.command(
    "audit",
    "the last admin actions in this conversation (admins)",
    summary="The last admin actions in this conversation, with old and new values",
    access=Access.ADMINS,
    private=True,
)
async def _audit(context: CommandContext, args: str) -> str:
    conversation = await context.conversation()
    rows = await context.repo.recent_audit(conversation.id, limit=AUDIT_SHOWN, actions_except=(EXPORT_ACTION,))
    lines = [
        messages.audit_line(e.created_at, e.actor_name, e.action, e.detail, e.old_value, e.new_value) for e, _ in rows
    ]
    return messages.audit_report(lines)


@COMMANDS.command(
    "export",
    "your own messages here and the replies to them, as a JSON file",
    summary="Your own messages in this conversation and the replies to them, as a JSON file",
    private=True,
)
async def _export(context: CommandContext, args: str) -> str | RouteResult:
    conversation = await context.conversation()
    author = context.message.author
    platform = context.message.conversation.platform
    last = await context.repo.last_action_by(platform, author.id, EXPORT_ACTION)
    now = datetime.now(timezone.utc)
    if last is not None and now - last < EXPORT_EVERY:
        return messages.export_too_soon(int((last + EXPORT_EVERY - now).total_seconds()) + 1)
    exchanges = await context.repo.author_exchanges(conversation.id, author.id)
    if not exchanges:
        return messages.NOTHING_TO_EXPORT
    data, kept = _export_document(context, exchanges, now)
    await context.repo.audit(
        conversation.id,
        platform=platform,
        actor_id=author.id,
        actor_name=author.name,
        action=EXPORT_ACTION,
        detail=f"messages={kept} bytes={len(data)}",
    )
    replies = sum(1 for exchange in exchanges[len(exchanges) - kept :] if exchange.reply is not None)
    filename = f"parley-export-{now:%Y%m%d-%H%M%S}.json"
    return RouteResult(
        Outcome.COMMAND,
        reply=messages.export_ready(kept, replies, truncated=kept < len(exchanges)),
        attachment=Attachment(filename, data),
        private=True,
    )


def _export_document(context: CommandContext, exchanges: list, now: datetime) -> tuple[bytes, int]:
    """The export file: the newest exchanges that fit `MAX_EXPORT_BYTES`, oldest first."""
    key = context.message.conversation

    def item(exchange) -> dict:  # noqa: ANN001
        message, reply = exchange.message, exchange.reply
        return {
            "sent_at": message.created_at.isoformat(),
            "platform_message_id": message.platform_message_id,
            "text": message.text,
            "archived": message.archived,
            "reply": None if reply is None else {"sent_at": reply.created_at.isoformat(), "text": reply.text},
        }

    head = {
        "conversation": {"platform": key.platform, "key": key.key},
        "author": {"id": context.message.author.id, "name": context.message.author.name},
        "exported_at": now.isoformat(),
    }
    items: list[dict] = []
    size = len(json.dumps(head)) + 64
    for exchange in reversed(exchanges):
        entry = item(exchange)
        cost = len(json.dumps(entry, ensure_ascii=False).encode()) + 2
        if items and size + cost > MAX_EXPORT_BYTES:
            break
        items.append(entry)
        size += cost
    items.reverse()
    document = {**head, "truncated": len(items) < len(exchanges), "messages": items}
    return json.dumps(document, ensure_ascii=False).encode(), len(items)

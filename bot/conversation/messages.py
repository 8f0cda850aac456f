"""Every sentence Parley's core says to people, in one place.

Outcomes travel as values (`bot.core.contracts.Refusal`, job outcomes, a command's numbers); this
module renders them to text. Adapters add only their platform's own words (Telegram's /start and
/ask, Discord's "Done.", the terminal's /exit). Commands' own help texts live in their declarations
(`bot.conversation.commands`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from bot.core.contracts import QueueLimit, Refusal, RefusalKind

if TYPE_CHECKING:
    from bot.core.types import GenerationSettings
    from bot.generation.client import BackendHealth

__all__ = [
    "render_refusal",
    "EMPTY_REPLY",
    "STOPPED",
    "STOPPING",
    "REGENERATING",
    "CONTINUING",
    "CUT_AT_LENGTH",
    "CONVERSATION_WAS_RESET",
    "close_code_fence",
    "stopped_reply",
    "UNEXPECTED_ERROR",
    "STORAGE_UNAVAILABLE",
    "ASK_USAGE",
    "JOB_CRASHED",
    "TEXT_ONLY",
    "job_failed",
    "backend_gave_up",
    "could_not_handle",
    "plural",
    "clip",
    "unknown_command",
    "help_text",
    "history_cleared",
    "system_prompt_shown",
    "system_prompt_set",
    "system_prompt_too_long",
    "NO_SYSTEM_PROMPT",
    "SYSTEM_PROMPT_CLEARED",
    "SYSTEM_PROMPT_DEFAULT",
    "settings_shown",
    "settings_now",
    "nothing_changed",
    "SettingProblem",
    "status_report",
    "model_report",
    "model_line",
    "forgot",
    "NOTHING_TO_FORGET",
    "audit_value",
    "audit_line",
    "audit_report",
    "NO_AUDIT",
    "export_ready",
    "export_too_soon",
    "NOTHING_TO_EXPORT",
    "EXPORT_IN_PRIVATE",
    "EXPORT_NO_FILES",
]


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`plural(1, "message")` → "1 message"; `plural(2, "reply", "replies")` → "2 replies"."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


def clip(text: str, limit: int = 300) -> str:
    """Text shown back to people (a system prompt) cut to `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- refusals and failures -----------------------------------------------------------------------


def render_refusal(refusal: Refusal) -> str:
    """The sentence a refused author reads."""
    kind = refusal.kind
    if kind is RefusalKind.NOT_ADMIN:
        return f"Only admins can use /{refusal.command} here. Nothing was changed."
    if kind is RefusalKind.RATE_LIMITED:
        return f"You're sending messages faster than I can answer; try again in {refusal.seconds} s."
    if kind is RefusalKind.TOO_LONG:
        if refusal.command is not None:
            return f"That command is too long ({refusal.count} characters)."
        return (
            f"That message is too long ({refusal.count} characters; the limit is {refusal.maximum}). "
            "Nothing was sent to the model."
        )
    if kind is RefusalKind.QUEUE_FULL:
        if refusal.limit is QueueLimit.USER:
            waiting = f"you already have {plural(refusal.count, 'request')} waiting"
            when = "Try again when one of yours is answered."
        elif refusal.limit is QueueLimit.CONVERSATION:
            waiting = f"{plural(refusal.count, 'request')} from this conversation are already waiting"
            when = "Try again when one is answered."
        else:
            waiting = f"{plural(refusal.count, 'request')} are already waiting"
            when = "Please try again in a minute."
        return f"I'm busy right now: {waiting} (the limit is {refusal.maximum}). {when}"
    if kind is RefusalKind.NOT_YOURS:
        return "Only the person who asked, or an admin, can use the buttons of that reply."
    if kind is RefusalKind.CONVERSATION_RESET:
        return CONVERSATION_WAS_RESET
    if kind is RefusalKind.CONTROL_EXPIRED:
        return "That button no longer applies: the reply has moved on."
    raise ValueError(f"no sentence for refusal {kind!r}")


def could_not_handle(reason: str) -> str:
    return f"Sorry, I could not handle that: {reason}"


UNEXPECTED_ERROR = "Sorry, something went wrong on my side. The error was logged."
ASK_USAGE = "Usage: /ask your question"
STORAGE_UNAVAILABLE = "Sorry, I can't keep track of messages right now, so that one was not taken. Please send it again in a minute."
JOB_CRASHED = "Sorry, something went wrong while answering. The error was logged."
EMPTY_REPLY = "(the model gave an empty reply)"
STOPPED = "[stopped]"
CONVERSATION_WAS_RESET = "This conversation was reset."
STOPPING = "Stopped."
"""What the presser of Stop reads (a toast, an ephemeral answer)."""
REGENERATING = "Answering that again."
CONTINUING = "Going on from where it stopped."
CUT_AT_LENGTH = "(cut at the length limit)"
"""For adapters to show beside a reply that carries Continue. Never part of the stored reply,
which stays the model's own text so that Continue goes on from exactly it."""


def close_code_fence(text: str) -> str:
    """`text` with a Markdown code block it leaves open closed, so what follows is not code."""
    opener: str | None = None  # the fence of the open block ("```" or "~~~"), None outside one
    for line in text.splitlines():
        stripped = line.lstrip()
        for fence in ("```", "~~~"):
            if stripped.startswith(fence) and (opener is None or opener == fence):
                opener = fence if opener is None else None
                break
    if opener is None:
        return text
    return f"{text}{opener}" if text.endswith("\n") else f"{text}\n{opener}"


def stopped_reply(text: str) -> str:
    """A reply stopped while it streamed, as shown and stored: what was shown, then the
    `STOPPED` marker, never inside a code block."""
    return f"{close_code_fence(text.rstrip())}\n{STOPPED}"
TEXT_ONLY = "I can only read text messages for now."
"""Adapters answer it to a direct message that has no text (a picture, a sticker)."""


def job_failed(reason: str) -> str:
    """A job the backend refused (too long for the context, out of memory for it...)."""
    return f"Sorry, I could not answer that: {reason}"


BACKEND_BUSY = "Sorry, the model server is overloaded; try again in a minute."
"""A job the model server kept refusing as busy or failing (HTTP 429, 503 ...) while it was retried."""


def backend_gave_up(attempts: int) -> str:
    """The backend went down while holding this job `attempts` times in a row."""
    return (
        "Sorry, the model crashed while answering this message, "
        f"{attempts} times in a row, so I gave up. Try a shorter message, or ask an admin to check the logs."
    )


# -- commands --------------------------------------------------------------------------------------


def unknown_command(name: str) -> str:
    return f"Unknown command /{name}. Try /help."


def help_text(bot_name: str, help_lines: list[str]) -> str:
    return "\n".join([f"{bot_name} answers your messages with a local language model. Commands:", *help_lines])


def history_cleared(archived: int, cancelled: int, new_prompt: str | None) -> str:
    reply = f"History cleared ({plural(archived, 'message')} forgotten"
    reply += f", {plural(cancelled, 'pending reply', 'pending replies')} cancelled)." if cancelled else ")."
    if new_prompt:
        reply += f"\nNew system prompt: {clip(new_prompt)}"
    return reply


NO_SYSTEM_PROMPT = "There is no system prompt."
SYSTEM_PROMPT_CLEARED = "System prompt cleared: the model gets none."
SYSTEM_PROMPT_DEFAULT = "System prompt back to the default."


def system_prompt_shown(prompt: str, *, is_default: bool) -> str:
    if not prompt:
        return NO_SYSTEM_PROMPT
    return f"System prompt ({'default' if is_default else 'set for this conversation'}): {clip(prompt)}"


def system_prompt_set(prompt: str) -> str:
    shown = clip(prompt)
    if shown.count("```") % 2:  # a lone fence would leave the rest of the message a code block
        shown += "\n```"
    return f"System prompt set: {shown}"


def system_prompt_too_long(count: int, maximum: int) -> str:
    return f"That system prompt is too long ({count} characters; the limit is {maximum})."


def _settings(values: Mapping[str, object]) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def settings_shown(settings: GenerationSettings, usage: str) -> str:
    return f"Settings: {_settings(settings.to_dict())}\n{usage}"


def settings_now(settings: GenerationSettings) -> str:
    return f"Settings now: {_settings(settings.to_dict())}"


def nothing_changed(problem: str, usage: str) -> str:
    return f"Nothing changed: {problem}.\n{usage}"


class SettingProblem:
    """Why `/set key=value ...` was not understood (the `problem` of `nothing_changed`)."""

    NOTHING = "nothing to set"

    @staticmethod
    def not_key_value(word: str) -> str:
        return f"{word!r} is not key=value"

    @staticmethod
    def unknown(key: str, known: list[str]) -> str:
        return f"unknown setting {key!r}; use {', '.join(known)}"

    @staticmethod
    def not_a_number(key: str, raw: str, *, integer: bool) -> str:
        return f"{key} must be {'an integer' if integer else 'a number'}, not {raw!r}"

    @staticmethod
    def out_of_range(key: str, low: float, high: float, raw: str) -> str:
        return f"{key} must be between {low:g} and {high:g}, not {raw}"


def model_line(health: BackendHealth) -> str:
    """`Model: name (quantization, dtype, on device, context N tokens)` (or who serves it), and the
    backend's restarts."""
    info = health.model
    if info is None:
        line = "Model: loading…" if health.alive else "Model: not running"
    else:
        line = f"Model: {info.name} ({info.how()}, context {info.context_window} tokens)"
    if health.restarts:
        line += f"; backend restarted {plural(health.restarts, 'time')}"
    return line


def status_report(
    health: BackendHealth,
    depth: int,
    position: int | None,
    history: int,
    settings: GenerationSettings,
    system_prompt: str,
) -> str:
    queue = f"Queue: {depth} waiting or running"
    queue += f"; your next reply is number {position}" if position else "; nothing of yours waiting"
    return "\n".join(
        [
            model_line(health),
            queue,
            f"History: {plural(history, 'message')}",
            f"Settings: {_settings(settings.to_dict())}",
            f"System prompt: {clip(system_prompt, 120) if system_prompt else '(none)'}",
        ]
    )


def model_report(health: BackendHealth, settings: GenerationSettings) -> str:
    info = health.model
    if info is None:
        return f"{model_line(health)}\nSettings here: {_settings(settings.to_dict())}"
    return "\n".join(
        [
            f"Model: {info.name}",
            f"Served by: {info.served_by}"
            if info.served_by
            else f"Quantization: {info.quantization}; dtype: {info.dtype}; device: {info.device}",
            f"Context window: {info.context_window} tokens",
            f"Settings here: {_settings(settings.to_dict())}",
        ]
    )


NOTHING_TO_FORGET = "There was nothing of yours to forget here."


def forgot(archived: int, cancelled: int) -> str:
    if not archived and not cancelled:
        return NOTHING_TO_FORGET
    reply = f"Forgot {plural(archived, 'message')} (yours and the replies to them)"
    return reply + (f"; {plural(cancelled, 'waiting reply', 'waiting replies')} cancelled." if cancelled else ".")


# -- the audit trail and a person's own data ----------------------------------------------------

NO_AUDIT = "No admin actions have been recorded in this conversation."


def audit_value(raw: str | None, limit: int = 60) -> str:
    """An audit row's old or new value (JSON) for people: `null` is the configured default."""
    if raw is None:
        return ""
    try:
        value = json.loads(raw)
    except ValueError:
        return clip(raw, limit)
    if value is None:
        return "(default)"
    if value == "":
        return "(none)"
    if isinstance(value, dict):
        return clip(" ".join(f"{k}={'default' if v is None else v}" for k, v in value.items()), limit)
    return clip(repr(value) if isinstance(value, str) else str(value), limit)


def audit_line(
    when: datetime, actor: str, action: str, detail: str, old: str | None, new: str | None, where: str = ""
) -> str:
    """One admin action: "2026-12-03 10:00 UTC Alice /system: 'Be brief.' → 'Be kind.'"."""
    stamp = when.strftime("%Y-%m-%d %H:%M UTC")
    change = f"{audit_value(old)} → {audit_value(new)}" if old is not None or new is not None else clip(detail, 80)
    place = f" in {where}" if where else ""
    return f"{stamp} {clip(actor, 40)}{place} /{action}: {change}".rstrip()


def audit_report(lines: Sequence[str]) -> str:
    if not lines:
        return NO_AUDIT
    return "\n".join([f"The last {plural(len(lines), 'admin action')} here, newest first:", *lines])


NOTHING_TO_EXPORT = "You have no messages stored in this conversation."
EXPORT_IN_PRIVATE = "Your export may hold private text: ask me for /export in a private chat with me."
EXPORT_NO_FILES = "This platform cannot send files; your export was not made."


def export_ready(messages: int, replies: int, truncated: bool) -> str:
    text = f"Your {plural(messages, 'message')} here and {plural(replies, 'reply', 'replies')} to them, as JSON."
    return text + (" Only the newest fitted the size limit." if truncated else "")


def export_too_soon(seconds: int) -> str:
    return f"You can export once every 10 minutes; try again in {seconds} s."

"""Every sentence Parley's core says to people, in one place.

Outcomes travel as values (`bot.core.contracts.Refusal`, job outcomes); this module renders them to
text. Adapters add only their platform's own words (Telegram's /start, Discord's "Done.").
"""

from __future__ import annotations

from bot.core.contracts import QueueLimit, Refusal, RefusalKind

__all__ = [
    "render_refusal",
    "EMPTY_REPLY",
    "STOPPED",
    "UNEXPECTED_ERROR",
    "JOB_CRASHED",
    "job_failed",
    "backend_gave_up",
    "could_not_handle",
    "plural",
]


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """`plural(1, "message")` → "1 message"; `plural(2, "reply", "replies")` → "2 replies"."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


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
    raise ValueError(f"no sentence for refusal {kind!r}")


def could_not_handle(reason: str) -> str:
    return f"Sorry, I could not handle that: {reason}"


UNEXPECTED_ERROR = "Sorry, something went wrong on my side. The error was logged."
JOB_CRASHED = "Sorry, something went wrong while answering. The error was logged."
EMPTY_REPLY = "(the model gave an empty reply)"
STOPPED = "[stopped]"


def job_failed(reason: str) -> str:
    """A job the backend refused (too long for the context, out of memory for it...)."""
    return f"Sorry, I could not answer that: {reason}"


def backend_gave_up(attempts: int) -> str:
    """The backend went down while holding this job `attempts` times in a row."""
    return (
        "Sorry, the model crashed while answering this message, "
        f"{attempts} times in a row, so I gave up. Try a shorter message, or ask an admin to check the logs."
    )

"""The platform-free message types every adapter converts to at its edge."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone

__all__ = [
    "Author",
    "ConversationKey",
    "IncomingMessage",
    "GenerationSettings",
    "ChatMessage",
    "Role",
    "JobStatus",
    "JobKind",
]


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(str, enum.Enum):
    """What a job does with its message."""

    REPLY = "reply"
    """Answer the message."""
    REGENERATE = "regenerate"
    """Answer it again (the Regenerate control): the new reply replaces the parent job's, in place."""
    CONTINUE = "continue"
    """Go on from where the parent job's reply was cut (the Continue control), appended to it."""


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Where a conversation lives: platform plus the platform's own id for the chat (and thread).

    `key` is the string stored in the database, e.g. "default" for the terminal, a channel id for
    Discord, "chat_id" or "chat_id:topic_id" for Telegram.
    """

    platform: str
    key: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.key}"


@dataclass(frozen=True, slots=True)
class Author:
    """Who wrote a message. `is_admin` is decided by the adapter, which knows the platform's roles."""

    id: str
    name: str
    is_admin: bool = False
    is_bot: bool = False


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One platform event, normalized. No discord/telegram object ever passes this edge."""

    conversation: ConversationKey
    message_id: str
    author: Author
    text: str
    is_direct: bool
    """True in a one-to-one chat (the user is the admin of their own conversation)."""
    addressed: bool
    """True when the bot should answer (mentioned, replied to, a DM, the terminal)."""
    reply_to: str | None = None
    sent_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """Sampling settings of one conversation; checked against `SETTING_RANGES` by `/set` and config."""

    temperature: float = 0.2
    top_p: float = 0.9
    max_new_tokens: int = 256

    def to_dict(self) -> dict[str, float | int]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}


# (type, minimum, maximum) for each generation setting; temperature 0 means greedy decoding.
SETTING_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.01, 1.0),
    "max_new_tokens": (int, 1, 4096),
}


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a prompt as the chat template sees it."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

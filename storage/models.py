"""The database tables, as SQLAlchemy 2.0 declarative models.

Every schema change here needs an Alembic revision in `migrations/versions/`; the test suite
compares these models against the migrated schema and fails when they drift apart.

Datetimes are timezone-aware UTC in Python. SQLite has no time zone type, so `UTCDateTime`
stores naive UTC there and hands back aware values; PostgreSQL gets `TIMESTAMP WITH TIME ZONE`.
Enumerations (`Role`, `JobStatus`) are stored as their string values and read back as members
(which are `str` subclasses, so comparing with plain strings works too).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot.core.types import ConversationKey, JobKind, JobStatus, Role

__all__ = [
    "Base",
    "Conversation",
    "Message",
    "Job",
    "AuditEntry",
    "HandledUpdateEntry",
    "Lease",
    "UTCDateTime",
    "StrEnum",
    "utcnow",
    "NAMING_CONVENTION",
    "PENDING_STATUSES",
]

# Named constraints, so batch migrations on SQLite (which rebuild tables) can find them again.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PENDING_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
"""A job in one of these states counts against the queue limits."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend; naive input is taken to be UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class StrEnum(TypeDecorator[Any]):
    """A `str` enum stored as its value in a VARCHAR; unknown values are refused on the way in."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum_cls: type[enum.Enum], length: int = 16) -> None:
        super().__init__(length)
        self.enum_cls = enum_cls

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_cls(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.enum_cls(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}


class Conversation(Base):
    """One chat: a Discord channel or DM, a Telegram chat (or topic), the terminal.

    `None` in `system_prompt` and the generation columns means "use the configured default", and
    "" in `system_prompt` means no system prompt at all (`bot.conversation.history`).
    """

    __tablename__ = "conversations"
    __table_args__ = (UniqueConstraint("platform", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(255))
    is_direct: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    system_prompt: Mapped[str | None] = mapped_column(Text, default=None)
    temperature: Mapped[float | None] = mapped_column(Float, default=None)
    top_p: Mapped[float | None] = mapped_column(Float, default=None)
    max_new_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def conversation_key(self) -> ConversationKey:
        return ConversationKey(self.platform, self.key)

    def __repr__(self) -> str:
        return f"Conversation(id={self.id!r}, platform={self.platform!r}, key={self.key!r})"


class Message(Base):
    """One message of a conversation. `/reset` sets `archived` instead of deleting anything."""

    __tablename__ = "messages"
    __table_args__ = (
        # NULL platform ids (messages the bot made up, e.g. a system note) never collide.
        UniqueConstraint("conversation_id", "platform_message_id"),
        Index("ix_messages_conversation_id_archived_id", "conversation_id", "archived", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    role: Mapped[Role] = mapped_column(StrEnum(Role))
    author_id: Mapped[str] = mapped_column(String(128))
    author_name: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text)
    platform_message_id: Mapped[str | None] = mapped_column(String(128), default=None)
    reply_to: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    edited_at: Mapped[datetime | None] = mapped_column(default=None)
    archived: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, conversation_id={self.conversation_id!r}, role={self.role!s}, "
            f"platform_message_id={self.platform_message_id!r})"
        )


class Job(Base):
    """One generation request: queued → running → done | failed | cancelled.

    `attempts` counts the times a worker died while holding the job (see `requeue_job`).
    `prompt` is the list of chat messages (`{"role", "content"}` dicts) sent to the worker.
    `owner` names the bot process that claimed the job (`Repository.owner`) and `heartbeat_at`
    is when that process last said it is still running it: with several bot processes on one
    database, start-up requeues only jobs whose owner is gone (see `requeue_interrupted`).
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_conversation_id_status", "conversation_id", "status"),
        Index("ix_jobs_message_id", "message_id"),
        Index("ix_jobs_owner_status", "owner", "status"),
        Index("ix_jobs_parent_job_id", "parent_job_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    status: Mapped[JobStatus] = mapped_column(StrEnum(JobStatus), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text, default=None)
    prompt: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, default=None)
    reply_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), default=None)
    reply_platform_ids: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    """Platform ids of the messages the reply was posted in so far (kept while it streams)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    owner: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.REPLY.value, server_default=JobKind.REPLY.value)
    """What the job does (`JobKind`): answer its message, answer it again, or continue a reply."""
    parent_job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    """REGENERATE and CONTINUE: the job whose reply this one replaces (its reply is archived when
    this one's is stored)."""
    finish_reason: Mapped[str | None] = mapped_column(String(16), default=None)
    """How the generation ended: "stop", "length" (Continue may go on) or "cancelled"."""
    shown_text: Mapped[str | None] = mapped_column(Text, default=None)
    """The text the streaming reply had shown so far: an attempt after a crash goes on from it."""

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, conversation_id={self.conversation_id!r}, status={self.status!s})"


class AuditEntry(Base):
    """One admin action (`/reset`, `/system`, `/set` …): who did what, where, when."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_conversation_id_id", "conversation_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    platform: Mapped[str] = mapped_column(String(32))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    actor_id: Mapped[str] = mapped_column(String(128))
    actor_name: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="")
    old_value: Mapped[str | None] = mapped_column(Text, default=None)
    """For a /system or /set change: what it replaced, as JSON (`null`: the configured default)."""
    new_value: Mapped[str | None] = mapped_column(Text, default=None)
    """For a /system or /set change: what it set, as JSON."""

    def __repr__(self) -> str:
        return f"AuditEntry(id={self.id!r}, action={self.action!r}, actor_id={self.actor_id!r})"


class HandledUpdateEntry(Base):
    """A platform update (a command, a notice-only event) that was handled: written in the same
    transaction as its effect, so an update delivered again after a crash changes nothing.

    Messages need no entry: they are recorded once by their platform id (`Message`). `update_id`
    is the platform's id of the message that carried the update; it is unique per conversation.
    """

    __tablename__ = "handled_updates"
    __table_args__ = (
        UniqueConstraint("platform", "conversation_key", "update_id"),
        Index("ix_handled_updates_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    conversation_key: Mapped[str] = mapped_column(String(255))
    update_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"HandledUpdateEntry({self.platform!r}, {self.conversation_key!r}, {self.update_id!r})"


class Lease(Base):
    """A role only one bot process may hold at a time (polling a Telegram token, a Discord gateway
    session): `holder` has it until `expires_at`, unless it renews first (`storage.leases`)."""

    __tablename__ = "leases"

    role: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column()
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Lease({self.role!r}, holder={self.holder!r}, expires_at={self.expires_at!r})"

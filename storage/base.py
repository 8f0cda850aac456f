"""The shared base of the storage operations: transactions, owner ids, small helpers.

Every public operation lives in `storage.conversations` (conversations, messages, audit) or
`storage.jobs` (the job queue's rows, owners and heartbeats); `storage.repository.Repository`
combines them. Database failures surface as `StorageError`; a missing row is `RecordNotFound`.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import Select, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.core.errors import StorageError
from storage.db import WRITE_OPTION, _describe
from storage.models import PENDING_STATUSES, Conversation, Job, Message, utcnow

__all__ = [
    "RepositoryBase",
    "RecordNotFound",
    "UNCHANGED",
    "Unchanged",
    "GENERATION_KEYS",
    "DEFAULT_STALE_AFTER",
    "HEARTBEAT_INTERVAL",
    "default_owner",
]

GENERATION_KEYS: Final = frozenset({"temperature", "top_p", "max_new_tokens"})

DEFAULT_STALE_AFTER: Final = timedelta(seconds=90)
"""A running job whose owner has not heartbeaten for this long is taken to be abandoned."""

HEARTBEAT_INTERVAL: Final = timedelta(seconds=20)
"""How often a bot process should call `Repository.heartbeat()` (well under `DEFAULT_STALE_AFTER`)."""


_ENQUEUE_LOCK_KEY: Final = 0x7061726C6579  # "parley": the advisory lock of record_and_enqueue (PostgreSQL)


def _pid_namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "-"
    return link.removeprefix("pid:[").removesuffix("]") or "-"


def default_owner() -> str:
    """This process's instance id, "host:pid-namespace:pid".

    Stable for the life of the process; a process restarted in the same pid (a container's pid 1)
    gets the same id, which `requeue_interrupted` reads as "my previous life".
    """
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}"


def _process_gone(owner: str) -> bool:
    """True only when `owner` is known to be a process of this machine (and pid namespace) that no
    longer exists. Unknown formats, other machines and live (or unknowable) pids are False."""
    try:
        host, namespace, pid_text = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "-" or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # that is us (handled as "previous life" by the caller)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, as someone else's process
        return False
    return False


def _as_timedelta(value: float | timedelta) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


class Unchanged(enum.Enum):
    """Type of `UNCHANGED`, the "leave this value as it is" argument."""

    UNCHANGED = "unchanged"


UNCHANGED: Final = Unchanged.UNCHANGED


class RecordNotFound(StorageError, LookupError):
    """The conversation or job a method must change does not exist."""


class RepositoryBase:
    """Parley's storage operations over an `async_sessionmaker` (`Database.sessions`).

    `owner` identifies this bot process in `jobs.owner` (default: `default_owner()`); give each
    process sharing a database its own. Running jobs are kept alive with `heartbeat()`.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, owner: str | None = None) -> None:
        self._sessions = sessions
        self.owner = owner or default_owner()
        self.heartbeat_interval = HEARTBEAT_INTERVAL

    # -- transactions ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions() as session, session.begin():
                # The first connection use decides how the transaction begins: BEGIN IMMEDIATE on
                # SQLite for writers (see storage.db), so read-then-write steps cannot interleave.
                await session.connection(execution_options={WRITE_OPTION: write})
                yield session
        except SQLAlchemyError as exc:
            raise StorageError(f"database error: {_describe(exc)}") from exc

    @staticmethod
    def _dialect(session: AsyncSession) -> str:
        return session.get_bind().dialect.name

    @classmethod
    def _now(cls, session: AsyncSession) -> Any:
        """The time for heartbeats: the server's clock on PostgreSQL (shared by every process that
        uses the database, whatever their own clocks say), this machine's on SQLite."""
        return func.now() if cls._dialect(session) == "postgresql" else utcnow()

    @staticmethod
    def _insert(session: AsyncSession, model: type[Any]) -> Any:
        """A dialect-aware INSERT that supports `on_conflict_do_nothing`, or None for other dialects."""
        dialect = session.get_bind().dialect.name
        if dialect == "sqlite":
            return sqlite.insert(model)
        if dialect == "postgresql":
            return postgresql.insert(model)
        return None

    # -- helpers --------------------------------------------------------------------------------

    async def _all(self, query: Select[Any]) -> list[Any]:
        async with self._transaction(write=False) as session:
            return list((await session.scalars(query)).all())

    @staticmethod
    async def _require(session: AsyncSession, model: type[Any], row_id: int) -> Any:
        row = await session.get(model, row_id, populate_existing=True)
        if row is None:
            raise RecordNotFound(f"no {model.__name__.lower()} with id {row_id}")
        return row

    @staticmethod
    async def _count_pending(session: AsyncSession, conversation_id: int | None) -> int:
        query = select(func.count()).select_from(Job).where(Job.status.in_(PENDING_STATUSES))
        if conversation_id is not None:
            query = query.where(Job.conversation_id == conversation_id)
        return int((await session.scalar(query)) or 0)

    @staticmethod
    async def _count_pending_for_author(session: AsyncSession, conversation_id: int, author_id: str) -> int:
        """Pending jobs of this author across the conversations of the same platform."""
        platform = select(Conversation.platform).where(Conversation.id == conversation_id).scalar_subquery()
        query = (
            select(func.count())
            .select_from(Job)
            .join(Message, Message.id == Job.message_id)
            .join(Conversation, Conversation.id == Job.conversation_id)
            .where(Job.status.in_(PENDING_STATUSES), Message.author_id == author_id, Conversation.platform == platform)
        )
        return int((await session.scalar(query)) or 0)

    @staticmethod
    async def _set_status(session: AsyncSession, where: Sequence[Any], **values: Any) -> list[int]:
        """UPDATE the jobs matching `where`; the ids of those changed."""
        statement = update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
        if session.get_bind().dialect.update_returning:
            return list((await session.scalars(statement.returning(Job.id))).all())
        ids = list((await session.scalars(select(Job.id).where(*where))).all())
        if ids:
            await session.execute(statement.where(Job.id.in_(ids)))
        return ids


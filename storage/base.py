"""The shared base of the storage operations: transactions, owner ids, small helpers.

Every public operation lives in `storage.conversations` (conversations, messages, audit) or
`storage.jobs` (the job queue's rows, owners and heartbeats); `storage.repository.Repository`
combines them. Database failures surface as `StorageError`; a missing row is `RecordNotFound`.
"""

from __future__ import annotations

import asyncio
import enum
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Final

from sqlalchemy import Select, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.core.errors import StorageError, StorageUnavailable
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


_ACTIVE_OWNERS: set[str] = set()
"""Owner ids of this process whose job queue runs now (`RepositoryBase.set_active`). Another id
with this process's host, namespace and pid is an earlier start (gone); these are alive."""


def _pid_namespace() -> str:
    """This kernel boot and pid namespace ("<boot id>.<namespace inode>"): a pid means one process
    only within it. Namespace inodes repeat across machines; boot ids do not."""
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return "-"
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            boot = file.read().strip().replace("-", "")[:8]
    except OSError:
        return "-"
    inode = link.removeprefix("pid:[").removesuffix("]")
    return f"{boot}.{inode}" if boot and inode else "-"


def default_owner(name: str = "") -> str:
    """A new instance id, "host:pid-namespace:pid:random" ("name@host:…" with a configured name).

    Each call (each start of a bot process) gets its own: two containers that share a hostname and
    both run as pid 1 never share an owner id. Host, namespace and pid stay readable, so a sibling
    on this machine can tell that the process behind an id is gone (`requeue_interrupted`).
    """
    base = f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{secrets.token_hex(4)}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")  # nothing that reads as a separator
    return f"{name}@{base}" if name else base


def _owner_process(owner: str) -> tuple[str, str, int] | None:
    """(host, pid namespace, pid) of an owner id, with or without the name and the random part
    (ids written before the random part was added have none); None for other formats."""
    parts = owner.rpartition("@")[2].split(":")
    if len(parts) not in (3, 4):
        return None
    try:
        return parts[0], parts[1], int(parts[2])
    except ValueError:
        return None


def _process_gone(owner: str) -> bool:
    """True only when `owner` is known to be a process of this machine (and pid namespace) that no
    longer exists. Unknown formats, other machines and live (or unknowable) pids are False."""
    process = _owner_process(owner)
    if process is None:
        return False
    host, namespace, pid = process
    if host != socket.gethostname() or namespace != _pid_namespace() or namespace == "-" or pid <= 0:
        return False
    if pid == os.getpid():
        # Our own pid in our own kernel and namespace: an earlier start (a container's pid 1
        # restarted, an app started again in this process), unless its queue runs here now.
        return owner not in _ACTIVE_OWNERS
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

    `owner` identifies this bot process in `jobs.owner` (default: a new `default_owner()`, unique
    to this start). Running jobs are kept alive with `heartbeat()`; storing a job's reply or
    progress checks that this owner still holds it (`JobNotOwned` otherwise).
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, owner: str | None = None) -> None:
        self._sessions = sessions
        self.owner = owner or default_owner()
        self.heartbeat_interval = HEARTBEAT_INTERVAL

    def set_active(self, active: bool) -> None:
        """The job queue says it runs (True) or stopped (False) this owner's jobs: while active,
        siblings in this same process do not take its jobs for an earlier start's."""
        if active:
            _ACTIVE_OWNERS.add(self.owner)
        else:
            _ACTIVE_OWNERS.discard(self.owner)

    # -- transactions ---------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions() as session, session.begin():
                # The first connection use decides how the transaction begins: BEGIN IMMEDIATE on
                # SQLite for writers (see storage.db), so read-then-write steps cannot interleave.
                await session.connection(execution_options={WRITE_OPTION: write})
                yield session
        except StorageError:
            raise
        except SQLAlchemyError as exc:
            # An outage (wait and try again) is told apart from a fault of this call.
            kind = StorageUnavailable if _is_outage(exc) else StorageError
            raise kind(f"database error: {_describe(exc)}") from exc
        except (OSError, asyncio.TimeoutError) as exc:  # a driver that could not connect at all (asyncpg)
            raise StorageUnavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # asyncpg raises its own errors while connecting (a server starting up or shutting
            # down, too many connections), outside SQLAlchemy's wrapping: an outage too.
            if not type(exc).__module__.startswith("asyncpg"):
                raise
            raise StorageUnavailable(f"database unreachable: {type(exc).__name__}: {exc}") from exc

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
    async def _require(session: AsyncSession, model: type[Any], row_id: int, *, lock: bool = False) -> Any:
        """The row, read afresh; `lock`: held (FOR UPDATE on PostgreSQL) until the transaction ends,
        for a check that the write after it relies on."""
        row = await session.get(model, row_id, populate_existing=True, with_for_update=lock or None)
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


def _is_outage(error: BaseException) -> bool:
    """Driver errors of a database that cannot be used for now: SQLite locked or full, a server
    that refused or dropped the connection, a pool with no connection to give."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    outages = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)
    if isinstance(error, outages):
        return True
    # PostgreSQL's SQLSTATE says so when a wrapped driver error is one: class 08 (connection
    # exceptions), 57P01-57P03 (shut down, crashed, "the database system is starting up"), 53300
    # (too many connections), whatever exception class the driver or SQLAlchemy chose for it.
    orig = getattr(error, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state is None and orig is not None:
        state = getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return isinstance(state, str) and (state.startswith("08") or state in {"57P01", "57P02", "57P03", "53300"})

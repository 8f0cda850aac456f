"""The storage functions the core (router, commands, queue) calls.

Every method is one transaction of its own. Results are ORM objects of `storage.models`, loaded
completely and detached from their session (`expire_on_commit=False`): read them freely, but
changing an attribute changes nothing in the database — call a method here instead. They have no
relationships to lazy-load, so nothing touches the database after a method returns.

Database failures (unreachable, locked past the busy timeout, a constraint broken) surface as
`StorageError`; a missing row that a method must act on is `RecordNotFound`.
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Select, false, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.core.contracts import QueueLimit
from bot.core.errors import QueueFull, StorageError
from bot.core.types import ConversationKey, JobStatus, Role

from .db import WRITE_OPTION, _describe
from .models import PENDING_STATUSES, AuditEntry, Conversation, Job, Message, utcnow

__all__ = [
    "Repository",
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


class Repository:
    """Parley's storage operations over an `async_sessionmaker` (`Database.sessions`).

    `owner` identifies this bot process in `jobs.owner` (default: `default_owner()`); give each
    process sharing a database its own. Running jobs are kept alive with `heartbeat()`.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, owner: str | None = None) -> None:
        self._sessions = sessions
        self.owner = owner or default_owner()

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

    # -- conversations --------------------------------------------------------------------------

    async def get_or_create_conversation(self, key: ConversationKey, *, is_direct: bool) -> Conversation:
        """The conversation for `key`, created on first sight. Safe when callers race for it.

        `is_direct` only matters on creation; an existing conversation keeps its own.
        """
        async with self._transaction(write=True) as session:
            values = {"platform": key.platform, "key": key.key, "is_direct": is_direct}
            insert = self._insert(session, Conversation)
            if insert is not None:
                await session.execute(insert.values(**values).on_conflict_do_nothing(index_elements=["platform", "key"]))
            else:
                await self._insert_ignoring_duplicate(session, Conversation(**values))
            query = select(Conversation).where(Conversation.platform == key.platform, Conversation.key == key.key)
            return (await session.scalars(query)).one()

    async def find_conversation(self, key: ConversationKey) -> Conversation | None:
        """The conversation for `key` if it exists; never creates one."""
        async with self._transaction(write=False) as session:
            query = select(Conversation).where(Conversation.platform == key.platform, Conversation.key == key.key)
            return (await session.scalars(query)).one_or_none()

    async def get_conversation(self, conversation_id: int) -> Conversation | None:
        async with self._transaction(write=False) as session:
            return await session.get(Conversation, conversation_id)

    async def set_system_prompt(self, conversation_id: int, text: str | None) -> Conversation:
        """Set the conversation's system prompt; None returns it to the configured default."""
        return await self._update_conversation(conversation_id, {"system_prompt": text})

    async def set_generation(self, conversation_id: int, **values: float | int | None) -> Conversation:
        """Set any of temperature, top_p, max_new_tokens (None: back to the configured default).

        Ranges are the caller's to check (`bot.types.SETTING_RANGES`); unknown keys are a `ValueError`.
        """
        unknown = set(values) - GENERATION_KEYS
        if unknown:
            raise ValueError(
                f"unknown generation setting(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(GENERATION_KEYS))}"
            )
        return await self._update_conversation(conversation_id, values)

    async def _update_conversation(self, conversation_id: int, values: dict[str, Any]) -> Conversation:
        async with self._transaction(write=True) as session:
            conversation = await self._require(session, Conversation, conversation_id)
            if values:
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                await session.refresh(conversation)
            return conversation

    async def reset_conversation(
        self, conversation_id: int, *, system_prompt: str | None | Unchanged = UNCHANGED
    ) -> tuple[int, list[int]]:
        """Archive every message and cancel the conversation's queued jobs, in one transaction.

        Returns (messages archived, ids of the cancelled jobs). Running jobs are left alone: the
        caller cancels them in the worker (and then `cancel_job`). With `system_prompt` (a text,
        or None for the configured default), the prompt is replaced in the same transaction.
        """
        async with self._transaction(write=True) as session:
            await self._require(session, Conversation, conversation_id)
            archived = await session.execute(
                update(Message)
                .where(Message.conversation_id == conversation_id, Message.archived.is_(False))
                .values(archived=True)
                .execution_options(synchronize_session=False)
            )
            cancelled = await self._set_status(
                session,
                (Job.conversation_id == conversation_id, Job.status == JobStatus.QUEUED),
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
            )
            if system_prompt is not UNCHANGED:
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id)
                    .values(system_prompt=system_prompt)
                    .execution_options(synchronize_session=False)
                )
            return archived.rowcount, cancelled

    # -- messages -------------------------------------------------------------------------------

    async def record_message(
        self,
        conversation_id: int,
        *,
        role: Role | str,
        author_id: str,
        author_name: str,
        text: str,
        platform_message_id: str | None = None,
        reply_to: str | None = None,
        created_at: datetime | None = None,
    ) -> tuple[Message, bool]:
        """Store one message; (message, True) when new.

        Idempotent on (conversation, platform_message_id): a platform delivering the same message
        twice gets the stored row back with False. Messages without a platform id always insert.
        """
        async with self._transaction(write=True) as session:
            return await self._record(
                session,
                conversation_id,
                role=Role(role),
                author_id=author_id,
                author_name=author_name,
                text=text,
                platform_message_id=platform_message_id,
                reply_to=reply_to,
                created_at=created_at or utcnow(),
            )

    async def _record(self, session: AsyncSession, conversation_id: int, **values: Any) -> tuple[Message, bool]:
        values["conversation_id"] = conversation_id
        platform_message_id = values.get("platform_message_id")
        insert = self._insert(session, Message)
        if insert is not None:
            statement = insert.values(**values).on_conflict_do_nothing(
                index_elements=["conversation_id", "platform_message_id"]
            )
            inserted = (await session.scalars(statement.returning(Message))).first()
            if inserted is not None:
                return inserted, True
        else:
            inserted = await self._insert_ignoring_duplicate(session, Message(**values))
            if inserted is not None:
                return inserted, True
        existing = await session.scalars(
            select(Message).where(
                Message.conversation_id == conversation_id, Message.platform_message_id == platform_message_id
            )
        )
        return existing.one(), False

    @staticmethod
    async def _insert_ignoring_duplicate(session: AsyncSession, row: Any) -> Any | None:
        """Portable fallback for dialects without ON CONFLICT: insert in a savepoint."""
        try:
            async with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            return None

    async def update_message_text(self, conversation_id: int, platform_message_id: str, text: str) -> bool:
        """Apply a platform edit; False when the message was never recorded."""
        return await self._update_message(conversation_id, platform_message_id, text=text, edited_at=utcnow())

    async def archive_message(self, conversation_id: int, platform_message_id: str) -> bool:
        """A message deleted on its platform leaves the history (archived, like /reset does)."""
        return await self._update_message(conversation_id, platform_message_id, archived=True)

    async def _update_message(self, conversation_id: int, platform_message_id: str, **values: Any) -> bool:
        async with self._transaction(write=True) as session:
            result = await session.execute(
                update(Message)
                .where(Message.conversation_id == conversation_id, Message.platform_message_id == platform_message_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount > 0

    async def forget_author(self, conversation_id: int, author_id: str) -> tuple[int, list[int]]:
        """`/forget`: archive everything `author_id` wrote in the conversation and the bot's replies
        to it, and cancel their queued jobs, in one transaction. Returns (archived, cancelled ids)."""
        async with self._transaction(write=True) as session:
            theirs = select(Message.id).where(
                Message.conversation_id == conversation_id, Message.author_id == author_id, Message.role == Role.USER
            )
            replies = select(Job.reply_message_id).where(Job.message_id.in_(theirs), Job.reply_message_id.is_not(None))
            result = await session.execute(
                update(Message)
                .where(Message.conversation_id == conversation_id, Message.archived.is_(False))
                .where(Message.id.in_(theirs) | Message.id.in_(replies))
                .values(archived=True)
                .execution_options(synchronize_session=False)
            )
            cancelled = await self._set_status(
                session,
                [Job.message_id.in_(theirs), Job.status == JobStatus.QUEUED],
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
            )
            return result.rowcount, cancelled

    async def get_message(self, message_id: int) -> Message | None:
        async with self._transaction(write=False) as session:
            return await session.get(Message, message_id)

    async def history(self, conversation_id: int, *, up_to_message_id: int | None = None) -> list[Message]:
        """The conversation's messages since the last reset, oldest first, up to and including `up_to_message_id`."""
        query = select(Message).where(Message.conversation_id == conversation_id, Message.archived.is_(False))
        if up_to_message_id is not None:
            query = query.where(Message.id <= up_to_message_id)
        return await self._all(query.order_by(Message.id))

    # -- messages that ask for an answer ------------------------------------------------------------

    async def record_and_enqueue(
        self,
        conversation_id: int,
        *,
        author_id: str,
        author_name: str,
        text: str,
        platform_message_id: str | None,
        reply_to: str | None = None,
        created_at: datetime | None = None,
        max_pending: int,
        max_pending_per_conversation: int,
        max_pending_per_user: int | None = None,
    ) -> tuple[Message, Job | None, bool]:
        """Record a user message and queue a job to answer it, in one transaction.

        Returns (message, job, created). A message seen before (same platform id) creates nothing:
        it comes back with the job made for it the first time (None if it was only recorded as
        context) and created=False.

        When queued + running jobs are already at `max_pending` in total, or at
        `max_pending_per_conversation` in this conversation, the message is still recorded and
        committed (it is context for later answers) but gets no job, and `QueueFull` is raised,
        saying which limit was reached and how many are waiting. The check and the insert are serialized (SQLite: the write
        lock; PostgreSQL: a transaction-scoped advisory lock), so the limits are exact, also
        across bot processes.
        """
        full: QueueFull | None = None
        async with self._transaction(write=True) as session:
            message, created = await self._record(
                session,
                conversation_id,
                role=Role.USER,
                author_id=author_id,
                author_name=author_name,
                text=text,
                platform_message_id=platform_message_id,
                reply_to=reply_to,
                created_at=created_at or utcnow(),
            )
            if not created:
                job = (
                    await session.scalars(select(Job).where(Job.message_id == message.id).order_by(Job.id.desc()))
                ).first()
                return message, job, False
            if self._dialect(session) == "postgresql":
                # Serialize the count-then-insert across every process on the database (held until
                # commit), so the limits are exact there too.
                await session.execute(select(func.pg_advisory_xact_lock(_ENQUEUE_LOCK_KEY)))
            waiting_here = await self._count_pending(session, conversation_id)
            waiting_total = await self._count_pending(session, None)
            waiting_yours = (
                await self._count_pending_for_author(session, conversation_id, author_id)
                if max_pending_per_user is not None
                else 0
            )
            if max_pending_per_user is not None and waiting_yours >= max_pending_per_user:
                full = QueueFull(QueueLimit.USER, waiting_yours, max_pending_per_user)
            elif waiting_here >= max_pending_per_conversation:
                full = QueueFull(QueueLimit.CONVERSATION, waiting_here, max_pending_per_conversation)
            elif waiting_total >= max_pending:
                full = QueueFull(QueueLimit.TOTAL, waiting_total, max_pending)
            else:
                job = Job(conversation_id=conversation_id, message_id=message.id, status=JobStatus.QUEUED)
                session.add(job)
                await session.flush()
                await session.refresh(job)
                return message, job, True
        assert full is not None
        raise full

    # -- audit ----------------------------------------------------------------------------------

    async def audit(
        self, conversation_id: int, *, platform: str, actor_id: str, actor_name: str, action: str, detail: str
    ) -> AuditEntry:
        """Write down one admin action."""
        async with self._transaction(write=True) as session:
            entry = AuditEntry(
                conversation_id=conversation_id,
                platform=platform,
                actor_id=actor_id,
                actor_name=actor_name,
                action=action,
                detail=detail,
            )
            session.add(entry)
            await session.flush()
            await session.refresh(entry)
            return entry

    async def audit_log(self, conversation_id: int) -> list[AuditEntry]:
        """The conversation's admin actions, oldest first."""
        query = select(AuditEntry).where(AuditEntry.conversation_id == conversation_id)
        return await self._all(query.order_by(AuditEntry.id))

    # -- jobs -----------------------------------------------------------------------------------

    async def get_job(self, job_id: int) -> Job | None:
        async with self._transaction(write=False) as session:
            return await session.get(Job, job_id)

    async def queued_jobs(self) -> list[Job]:
        """Every queued job, oldest first (the queue picks among them fairly)."""
        return await self._all(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id))

    async def running_jobs(self) -> list[Job]:
        return await self._all(select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.id))

    async def pending_jobs_for(self, conversation_id: int) -> list[Job]:
        """The conversation's queued and running jobs, oldest first."""
        query = select(Job).where(Job.conversation_id == conversation_id, Job.status.in_(PENDING_STATUSES))
        return await self._all(query.order_by(Job.id))

    async def pending_count(self, conversation_id: int | None = None) -> int:
        """Queued + running jobs, in one conversation or (None) in all."""
        async with self._transaction(write=False) as session:
            return await self._count_pending(session, conversation_id)

    async def mark_running(self, job_id: int, prompt: list[dict[str, Any]]) -> bool:
        """queued → running for this process (`owner`), storing the prompt sent to the worker.

        False if the job was not queued, or (PostgreSQL) is being claimed or changed by another
        transaction right now: the row is taken with `FOR UPDATE SKIP LOCKED`, so two processes
        never both get True for one job. On SQLite the write lock (BEGIN IMMEDIATE) serializes it.
        """
        async with self._transaction(write=True) as session:
            where: tuple[Any, ...] = (Job.id == job_id, Job.status == JobStatus.QUEUED)
            if self._dialect(session) == "postgresql":
                locked = await session.scalar(select(Job.id).where(*where).with_for_update(skip_locked=True))
                if locked is None:
                    return False
            changed = await self._set_status(
                session,
                where,
                status=JobStatus.RUNNING,
                started_at=utcnow(),
                prompt=prompt,
                owner=self.owner,
                heartbeat_at=self._now(session),
            )
            return bool(changed)

    async def claim_next(
        self,
        limit: int = 1,
        *,
        among: Sequence[int] | None = None,
        exclude_conversation_ids: Collection[int] = (),
    ) -> list[Job]:
        """Claim up to `limit` queued jobs for this process (queued → running, owner set), oldest
        first or in the order of `among` (job ids the caller chose, e.g. fairly); the claimed jobs.

        On PostgreSQL the candidates are locked with `SELECT … FOR UPDATE SKIP LOCKED`, so
        processes claiming at the same time split the queue between them and never wait on, or
        double-claim, one another's jobs. The prompt is not stored (`mark_running` does that for a
        job still queued); `set_prompt` stores it for a claimed one.
        """
        if limit <= 0 or (among is not None and not among):
            return []
        async with self._transaction(write=True) as session:
            query = select(Job.id).where(Job.status == JobStatus.QUEUED)
            if among is not None:
                query = query.where(Job.id.in_(list(among)))
            if exclude_conversation_ids:
                query = query.where(Job.conversation_id.not_in(list(exclude_conversation_ids)))
            query = query.order_by(Job.id)
            if among is None:
                query = query.limit(limit)
            if self._dialect(session) == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list((await session.scalars(query)).all())
            if among is not None:
                position = {job_id: index for index, job_id in enumerate(among)}
                ids = sorted(ids, key=position.__getitem__)[:limit]
            if not ids:
                return []
            claimed = await self._set_status(
                session,
                (Job.id.in_(ids), Job.status == JobStatus.QUEUED),
                status=JobStatus.RUNNING,
                started_at=utcnow(),
                owner=self.owner,
                heartbeat_at=self._now(session),
            )
            jobs = (await session.scalars(select(Job).where(Job.id.in_(claimed)))).all()
            by_id = {job.id: job for job in jobs}
            return [by_id[job_id] for job_id in ids if job_id in by_id]

    async def set_prompt(self, job_id: int, prompt: list[dict[str, Any]]) -> bool:
        """Store the prompt of a job this process is running; False if it is not (any more)."""
        async with self._transaction(write=True) as session:
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.owner == self.owner)
                .values(prompt=prompt)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount > 0

    async def heartbeat(self, owner: str | None = None) -> int:
        """Say that `owner` (default: this process) is still running its jobs; how many it runs.

        Call it every `HEARTBEAT_INTERVAL` while the process lives (it is cheap: one UPDATE).
        """
        owner = owner or self.owner
        async with self._transaction(write=True) as session:
            result = await session.execute(
                update(Job)
                .where(Job.owner == owner, Job.status == JobStatus.RUNNING)
                .values(heartbeat_at=self._now(session))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount

    async def finish_job(
        self, job_id: int, *, reply_text: str, author_id: str, author_name: str, platform_message_id: str | None
    ) -> Message:
        """Store the assistant's reply and mark the job done, in one transaction.

        The reply answers the job's user message (`reply_to` is that message's platform id). If the
        job was cancelled (or otherwise ended) meanwhile — a `/reset` racing the last delta — the
        reply is still stored, archived so it stays out of the history, and the status is kept.
        """
        async with self._transaction(write=True) as session:
            job = await self._require(session, Job, job_id)
            question = await session.get(Message, job.message_id)
            pending = job.status in PENDING_STATUSES
            reply, _ = await self._record(
                session,
                job.conversation_id,
                role=Role.ASSISTANT,
                author_id=author_id,
                author_name=author_name,
                text=reply_text,
                platform_message_id=platform_message_id,
                reply_to=question.platform_message_id if question is not None else None,
                created_at=utcnow(),
                archived=not pending,
            )
            values: dict[str, Any] = {"reply_message_id": reply.id}
            if pending:
                values.update(status=JobStatus.DONE, finished_at=utcnow())
            await session.execute(
                update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
            )
            return reply

    async def fail_job(self, job_id: int, error: str) -> bool:
        """queued/running → failed with `error`; False if the job had already ended."""
        async with self._transaction(write=True) as session:
            changed = await self._set_status(
                session,
                (Job.id == job_id, Job.status.in_(PENDING_STATUSES)),
                status=JobStatus.FAILED,
                error=error,
                finished_at=utcnow(),
            )
            return bool(changed)

    async def cancel_job(self, job_id: int) -> bool:
        """queued/running → cancelled; False if the job had already ended."""
        async with self._transaction(write=True) as session:
            changed = await self._set_status(
                session,
                (Job.id == job_id, Job.status.in_(PENDING_STATUSES)),
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
            )
            return bool(changed)

    async def requeue_job(self, job_id: int, error: str) -> int:
        """running → queued after the worker died holding it: attempts += 1, `error` kept.

        Returns the attempts so far, for the caller to compare with its retry limit (and
        `fail_job` past it). A job that is not running is left as it is; its attempts come back.
        """
        async with self._transaction(write=True) as session:
            await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(
                    status=JobStatus.QUEUED,
                    attempts=Job.attempts + 1,
                    error=error,
                    started_at=None,
                    owner=None,
                    heartbeat_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            job = await self._require(session, Job, job_id)
            return job.attempts

    async def set_reply_platform_ids(self, job_id: int, ids: Sequence[str]) -> None:
        """Remember where a streaming reply is posted, so a restart edits it instead of reposting."""
        async with self._transaction(write=True) as session:
            await session.execute(
                update(Job).where(Job.id == job_id).values(reply_platform_ids=list(ids)).execution_options(synchronize_session=False)
            )

    async def requeue_interrupted(
        self,
        owner: str | None = None,
        *,
        stale_after: float | timedelta | None = DEFAULT_STALE_AFTER,
        own_jobs: bool = True,
    ) -> int:
        """At start-up: jobs a crash left running go back to queued (attempts unchanged); how many.

        Only jobs no live process is running: those of `owner` (default: this process's id, i.e.
        its previous life), of a process of this machine that no longer exists, without an owner
        (left by a Parley before revision 0003), or whose heartbeat (else start) is older than
        `stale_after` (seconds or a timedelta; None: never by age). Another live process's jobs
        stay running. `own_jobs=False` leaves `owner`'s jobs alone too: for calling it now and then
        while running, to take over the jobs of processes that died meanwhile.
        """
        owner = owner or self.owner
        async with self._transaction(write=True) as session:
            last_seen = func.coalesce(Job.heartbeat_at, Job.started_at)
            if stale_after is None:
                stale: Any = false()
            elif self._dialect(session) == "postgresql":
                stale = last_seen.is_(None) | (last_seen < func.now() - _as_timedelta(stale_after))
            else:
                stale = last_seen.is_(None) | (last_seen < utcnow() - _as_timedelta(stale_after))
            query = select(Job.id, Job.owner, stale.label("stale")).where(Job.status == JobStatus.RUNNING)
            if self._dialect(session) == "postgresql":
                # Rows locked right now belong to someone busy with them: not abandoned.
                query = query.with_for_update(of=Job, skip_locked=True)
            rows = (await session.execute(query)).all()
            ids = [
                row.id
                for row in rows
                if (row.owner == owner and own_jobs)
                or (row.owner != owner and (row.owner is None or row.stale or _process_gone(row.owner)))
            ]
            if not ids:
                return 0
            changed = await self._set_status(
                session,
                (Job.id.in_(ids), Job.status == JobStatus.RUNNING),
                status=JobStatus.QUEUED,
                started_at=None,
                owner=None,
                heartbeat_at=None,
            )
            return len(changed)

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


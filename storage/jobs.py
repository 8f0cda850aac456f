"""Storage of generation jobs: the queue's rows, their owners (bot processes) and heartbeats.

Jobs go queued → running → done | failed | cancelled. Several bot processes may share a database:
a running job names its owner, which heartbeats it; a dead or silent owner's jobs are re-queued.
What must hold across processes is checked here, not in a process's memory: a conversation has at
most one running job (the claim refuses a second), cancellation is the job's stored status, and
a reply or its progress is stored only by the job's current owner (`JobNotOwned` otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import false, func, select, text, update

from bot.core.errors import JobNotOwned
from bot.core.types import JobStatus, Role
from storage.base import (
    DEFAULT_STALE_AFTER,
    RepositoryBase,
    _as_timedelta,
    _process_gone,
)
from storage.models import PENDING_STATUSES, Job, Message, utcnow

__all__ = ["JobRecords"]

_CLAIM_LOCK_KEY = 0x70617231  # "par1": with a conversation id, the advisory lock of claiming in it (PostgreSQL)


class JobRecords(RepositoryBase):
    """The job queue's rows: claiming (`mark_running`), finishing, re-queueing, heartbeats."""

    # -- jobs -----------------------------------------------------------------------------------

    async def get_job(self, job_id: int) -> Job | None:
        async with self._transaction(write=False) as session:
            return await session.get(Job, job_id)

    async def queued_jobs(self) -> list[Job]:
        """Every queued job, oldest first (the queue picks among them fairly)."""
        return await self._all(select(Job).where(Job.status == JobStatus.QUEUED).order_by(Job.id))

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

        False if the job was not queued, if its conversation has a running job (in any process:
        replies of one conversation are written one at a time, each knowing the ones before), or
        (PostgreSQL) if the job or its conversation is being claimed by another transaction right
        now: the row is taken with `FOR UPDATE SKIP LOCKED` and the conversation with a
        transaction-scoped advisory lock, so two processes never both get True for one job or one
        conversation. On SQLite the write lock (BEGIN IMMEDIATE) serializes the whole claim.
        """
        async with self._transaction(write=True) as session:
            where: tuple[Any, ...] = (Job.id == job_id, Job.status == JobStatus.QUEUED)
            query = select(Job.conversation_id).where(*where)
            postgres = self._dialect(session) == "postgresql"
            conversation_id = await session.scalar(query.with_for_update(skip_locked=True) if postgres else query)
            if conversation_id is None:
                return False
            if postgres:
                locked = await session.scalar(
                    text("SELECT pg_try_advisory_xact_lock(:key, :conversation)"),
                    {"key": _CLAIM_LOCK_KEY, "conversation": conversation_id},
                )
                if not locked:
                    return False
            busy = await session.scalar(
                select(Job.id).where(Job.conversation_id == conversation_id, Job.status == JobStatus.RUNNING).limit(1)
            )
            if busy is not None:
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
        self,
        job_id: int,
        *,
        reply_text: str,
        author_id: str,
        author_name: str,
        platform_message_id: str | None,
        done: bool = True,
        finish_reason: str | None = None,
    ) -> Message:
        """Store the assistant's reply and mark the job done, in one transaction.

        With `done=False` the job stays running with its reply stored (`reply_message_id`): the
        reply is being delivered, and `complete_job` ends it; an attempt that finds a running job
        with a stored reply delivers that text instead of generating anew (a crash in between).

        The reply answers the job's user message (`reply_to` is that message's platform id). If the
        job was cancelled (or otherwise ended) meanwhile — a `/reset` racing the last delta — or its
        question was archived meanwhile (a `/forget` or `/reset`), the reply is still stored, archived
        so it stays out of the history, and the job's status is kept. `JobNotOwned` (nothing stored)
        when this process does not own the job (any more): another process answers it.

        A follow-up job's reply (Regenerate, Continue) replaces its parent's: the parent's reply is
        archived in the same transaction (unless the new one is stored archived itself).
        `finish_reason` is how the generation ended ("length": Continue may go on).
        """
        async with self._transaction(write=True) as session:
            job = await self._require(session, Job, job_id, lock=True)
            if job.owner != self.owner:
                raise JobNotOwned(f"job {job_id} is owned by {job.owner!r}, not by this process ({self.owner})")
            question = await session.get(Message, job.message_id)
            pending = job.status in PENDING_STATUSES
            archived = not pending or (question is not None and question.archived)
            reply = await self._record_reply(
                session, job, question, reply_text, author_id, author_name, platform_message_id, archived=archived
            )
            values: dict[str, Any] = {"reply_message_id": reply.id, "finish_reason": finish_reason}
            if pending and done:
                values.update(status=JobStatus.DONE, finished_at=utcnow())
            await session.execute(
                update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
            )
            return reply

    async def store_stopped_reply(
        self, job_id: int, *, reply_text: str, author_id: str, author_name: str, platform_message_id: str | None
    ) -> Message | None:
        """A reply stopped while it streamed (the Stop control, or a cancellation): the job ends
        cancelled (if it had not already) and what was shown is stored as its reply, in one
        transaction. When its question left the history (a `/reset` or `/forget` stopped it),
        nothing is stored (None): what was said to be forgotten is not kept in any form.
        `JobNotOwned` when another process runs the job."""
        async with self._transaction(write=True) as session:
            job = await self._require(session, Job, job_id, lock=True)
            if job.status in PENDING_STATUSES and job.owner != self.owner:
                raise JobNotOwned(f"job {job_id} is owned by {job.owner!r}, not by this process ({self.owner})")
            question = await session.get(Message, job.message_id)
            values: dict[str, Any] = {"finish_reason": "cancelled"}
            reply = None
            if question is not None and not question.archived:
                reply = await self._record_reply(
                    session, job, question, reply_text, author_id, author_name, platform_message_id, archived=False
                )
                values["reply_message_id"] = reply.id
            if job.status in PENDING_STATUSES:
                values.update(status=JobStatus.CANCELLED, finished_at=utcnow())
            await session.execute(
                update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
            )
            return reply

    async def _record_reply(
        self,
        session: Any,
        job: Job,
        question: Message | None,
        text: str,
        author_id: str,
        author_name: str,
        platform_message_id: str | None,
        *,
        archived: bool,
    ) -> Message:
        """Insert the job's reply (answering its question); a reply that enters the history
        replaces its parent's first (it takes over the parent's message ids)."""
        if not archived:
            await self._archive_parent_reply(session, job)
        reply, _ = await self._record(
            session,
            job.conversation_id,
            role=Role.ASSISTANT,
            author_id=author_id,
            author_name=author_name,
            text=text,
            platform_message_id=platform_message_id,
            reply_to=question.platform_message_id if question is not None else None,
            created_at=utcnow(),
            archived=archived,
        )
        return reply

    @staticmethod
    async def _archive_parent_reply(session: Any, job: Job) -> None:
        """A follow-up's reply replaces its parent's: the parent's leaves the history (archived)
        and gives up its platform message id, which the new reply (shown in the same messages)
        takes over."""
        if job.parent_job_id is None:
            return
        parent = await session.get(Job, job.parent_job_id)
        if parent is not None and parent.reply_message_id is not None:
            await session.execute(
                update(Message).where(Message.id == parent.reply_message_id)
                .values(archived=True, platform_message_id=None)
                .execution_options(synchronize_session=False)
            )

    async def complete_job(self, job_id: int, *, shown: bool, platform_message_id: str | None, error: str = "") -> bool:
        """End a job whose reply `finish_job(done=False)` stored: done when the reply was `shown`
        (its first message's platform id recorded), else failed with `error` and the reply archived
        out of the history. False if the job had ended meanwhile (cancelled: its reply is archived);
        `JobNotOwned` when another process runs it now."""
        async with self._transaction(write=True) as session:
            job = await self._require(session, Job, job_id, lock=True)
            if job.status == JobStatus.RUNNING and job.owner != self.owner:
                raise JobNotOwned(f"job {job_id} is owned by {job.owner!r}, not by this process ({self.owner})")
            running = job.status == JobStatus.RUNNING
            if job.reply_message_id is not None:
                values: dict[str, Any] = {}
                if platform_message_id is not None:
                    values["platform_message_id"] = platform_message_id
                if not (running and shown):
                    values["archived"] = True
                if values:
                    await session.execute(
                        update(Message).where(Message.id == job.reply_message_id).values(**values)
                        .execution_options(synchronize_session=False)
                    )
            if not running:
                return False
            status = {"status": JobStatus.DONE} if shown else {"status": JobStatus.FAILED, "error": error}
            await session.execute(
                update(Job).where(Job.id == job_id).values(**status, finished_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return True

    async def fail_job(self, job_id: int, error: str) -> bool:
        """queued/running → failed with `error`; False if the job had already ended.

        A running job is failed only by its owner: `JobNotOwned` if another process runs it now.
        """
        async with self._transaction(write=True) as session:
            mine = (Job.status == JobStatus.QUEUED) | (Job.owner == self.owner)
            changed = await self._set_status(
                session,
                (Job.id == job_id, Job.status.in_(PENDING_STATUSES), mine),
                status=JobStatus.FAILED,
                error=error,
                finished_at=utcnow(),
            )
            if not changed:
                await self._check_owner(session, job_id)
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
        `JobNotOwned` if another process runs it now.
        """
        async with self._transaction(write=True) as session:
            await self._check_owner(session, job_id)
            await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.owner == self.owner)
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
        """Remember where a streaming reply is posted, so a restart edits it instead of reposting.

        Only the job's owner may: `JobNotOwned` otherwise (its attempt must stop).
        """
        async with self._transaction(write=True) as session:
            changed = await self._set_status(session, (Job.id == job_id, Job.owner == self.owner), reply_platform_ids=list(ids))
            if not changed:
                await self._require(session, Job, job_id)
                raise JobNotOwned(f"job {job_id} is no longer owned by this process ({self.owner})")

    async def _check_owner(self, session: Any, job_id: int) -> None:
        """`JobNotOwned` if the job runs under another owner; `RecordNotFound` if there is none."""
        job = await self._require(session, Job, job_id, lock=True)
        if job.status is JobStatus.RUNNING and job.owner != self.owner:
            raise JobNotOwned(f"job {job_id} is running in {job.owner!r}, not in this process ({self.owner})")

    # -- what several processes watch -------------------------------------------------------------

    async def job_states(self, job_ids: Sequence[int]) -> dict[int, tuple[JobStatus, str | None]]:
        """(status, owner) of each of these jobs that exists: one query, for a process watching
        the jobs it runs or waits on (cancelled, finished or taken over elsewhere)."""
        if not job_ids:
            return {}
        async with self._transaction(write=False) as session:
            rows = await session.execute(select(Job.id, Job.status, Job.owner).where(Job.id.in_(list(job_ids))))
            return {row.id: (JobStatus(row.status), row.owner) for row in rows}

    async def owned_running_jobs(self) -> list[int]:
        """The ids of the jobs stored as running under this process's owner id."""
        query = select(Job.id).where(Job.status == JobStatus.RUNNING, Job.owner == self.owner).order_by(Job.id)
        return await self._all(query)

    async def busy_conversations(self) -> set[int]:
        """Conversations with a running job, in any process (the claim refuses their jobs)."""
        return set(await self._all(select(Job.conversation_id).where(Job.status == JobStatus.RUNNING).distinct()))

    async def requeue_stranded(self, job_ids: Sequence[int]) -> int:
        """running → queued for these jobs of this owner that no attempt works on any more (their
        finishing failed, a task died): attempts unchanged, so they are simply answered again."""
        if not job_ids:
            return 0
        async with self._transaction(write=True) as session:
            changed = await self._set_status(
                session,
                (Job.id.in_(list(job_ids)), Job.status == JobStatus.RUNNING, Job.owner == self.owner),
                status=JobStatus.QUEUED,
                started_at=None,
                owner=None,
                heartbeat_at=None,
            )
            return len(changed)

    async def requeue_interrupted(
        self,
        owner: str | None = None,
        *,
        stale_after: float | timedelta | None = DEFAULT_STALE_AFTER,
        own_jobs: bool = True,
    ) -> int:
        """At start-up: jobs a crash left running go back to queued (attempts unchanged); how many.

        Only jobs no live process is running: those of `owner` (default: this process's id; each
        start has a new one, so a previous life shows as a process of this machine that no longer
        exists, or by its stale heartbeat), of a process of this machine that no longer exists, without an owner
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

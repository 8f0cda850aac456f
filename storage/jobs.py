"""Storage of generation jobs: the queue's rows, their owners (bot processes) and heartbeats.

Jobs go queued → running → done | failed | cancelled. Several bot processes may share a database:
a running job names its owner, which heartbeats it; a dead or silent owner's jobs are re-queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import false, func, select, update

from bot.core.types import JobStatus, Role
from storage.base import (
    DEFAULT_STALE_AFTER,
    RepositoryBase,
    _as_timedelta,
    _process_gone,
)
from storage.models import PENDING_STATUSES, Job, Message, utcnow

__all__ = ["JobRecords"]


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

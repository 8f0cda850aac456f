"""Retention: deleting what is older than `[storage] keep_days`, a bounded batch at a time.

Only what no longer shapes a conversation goes: finished jobs (done, failed, cancelled) and
archived messages (after `/reset`, `/forget` or a deletion on the platform) that no remaining
job points at. Each batch is one short transaction of at most `batch_size` rows, with a pause
between batches, so a large backlog never holds the database (SQLite's write lock) for long.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, exists, or_, select

from bot.core.errors import StorageError
from bot.core.types import JobStatus
from storage.base import RepositoryBase
from storage.models import Job, Message, utcnow

__all__ = ["RetentionRecords", "RetentionSweeper", "SweepReport", "FINISHED_STATUSES"]

log = logging.getLogger("parley.retention")

FINISHED_STATUSES = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep deleted, and in how many transactions."""

    jobs: int = 0
    messages: int = 0
    batches: int = 0


class RetentionRecords(RepositoryBase):
    """`sweep_older_than`: the retention sweep the runtime runs daily."""

    async def sweep_older_than(
        self, age: timedelta, *, batch_size: int = 500, pause: float = 0.05, now: datetime | None = None
    ) -> SweepReport:
        """Delete finished jobs and archived messages created more than `age` ago, `batch_size`
        rows per transaction with `pause` seconds between transactions."""
        cutoff = (now or utcnow()) - age
        jobs = messages = batches = 0
        while True:
            deleted = await self._delete_batch(self._old_jobs(cutoff, batch_size), Job)
            if not deleted:
                break
            jobs, batches = jobs + deleted, batches + 1
            await asyncio.sleep(pause)
        while True:
            deleted = await self._delete_batch(self._old_messages(cutoff, batch_size), Message)
            if not deleted:
                break
            messages, batches = messages + deleted, batches + 1
            await asyncio.sleep(pause)
        return SweepReport(jobs=jobs, messages=messages, batches=batches)

    @staticmethod
    def _old_jobs(cutoff: datetime, limit: int):  # noqa: ANN205
        return (
            select(Job.id)
            .where(Job.status.in_(FINISHED_STATUSES), Job.created_at < cutoff)
            .order_by(Job.id)
            .limit(limit)
        )

    @staticmethod
    def _old_messages(cutoff: datetime, limit: int):  # noqa: ANN205
        referenced = exists().where(or_(Job.message_id == Message.id, Job.reply_message_id == Message.id))
        return (
            select(Message.id)
            .where(Message.archived.is_(True), Message.created_at < cutoff, ~referenced)
            .order_by(Message.id)
            .limit(limit)
        )

    async def _delete_batch(self, ids_query, model: type) -> int:  # noqa: ANN001
        async with self._transaction(write=True) as session:
            ids = list((await session.scalars(ids_query)).all())
            if ids:
                await session.execute(
                    delete(model).where(model.id.in_(ids)).execution_options(synchronize_session=False)
                )
            return len(ids)


class RetentionSweeper:
    """Runs `sweep_older_than(keep_days)` on a repository: first `first_after` seconds after
    `start()`, then every `every` seconds, until `stop()`. A failed sweep is logged and tried
    again at the next turn (the database may be back by then)."""

    def __init__(
        self, repo: RetentionRecords, *, keep_days: int, first_after: float = 60.0, every: float = 86_400.0
    ) -> None:
        self.repo = repo
        self.keep = timedelta(days=keep_days)
        self.first_after = first_after
        self.every = every
        self.last: SweepReport | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="parley-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        await asyncio.sleep(self.first_after)
        while True:
            try:
                self.last = report = await self.repo.sweep_older_than(self.keep)
                if report.jobs or report.messages:
                    log.info(
                        "retention: deleted %d finished jobs and %d archived messages older than %d days",
                        report.jobs, report.messages, self.keep.days,
                    )
            except StorageError as exc:
                log.warning("retention sweep failed (%s); trying again in %.0f s", exc, self.every)
            await asyncio.sleep(self.every)

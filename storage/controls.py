"""Storage of what reply controls (Stop, Regenerate, Continue) ask for, and of a streaming reply's
progress (the text shown so far, for crash resume).

A press takes effect once: the change it makes (a job stopped, a follow-up job queued) and the
record of its platform update (`Repository.handling` names it) are one transaction, like an admin
command's. Follow-up jobs (`JobKind.REGENERATE`, `JobKind.CONTINUE`) answer the same message as
the job they follow (`parent_job_id`); storing their reply archives the parent's
(`JobRecords.finish_job`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select

from bot.core.contracts import QueueLimit
from bot.core.errors import JobNotOwned, QueueFull
from bot.core.types import JobKind, JobStatus
from storage.base import _ENQUEUE_LOCK_KEY
from storage.models import PENDING_STATUSES, Job, Message, utcnow
from storage.updates import HandledUpdates

__all__ = ["ControlRecords"]


class ControlRecords(HandledUpdates):
    """Stop and follow-up jobs; which reply is a conversation's newest; a reply's shown text."""

    async def newest_reply_job(self, conversation_id: int) -> int | None:
        """The job whose reply is the conversation's newest: the newest job that is queued or
        running or has a reply in the history. Controls on older replies have expired."""
        query = (
            select(func.max(Job.id))
            .select_from(Job)
            .outerjoin(Message, Message.id == Job.reply_message_id)
            .where(
                Job.conversation_id == conversation_id,
                Job.status.in_(PENDING_STATUSES) | (Job.reply_message_id.is_not(None) & Message.archived.is_(False)),
            )
        )
        async with self._transaction(write=False) as session:
            return await session.scalar(query)

    async def pending_followup(self, parent_job_id: int) -> Job | None:
        """A queued or running Regenerate or Continue of `parent_job_id`'s reply, if there is one."""
        query = select(Job).where(Job.parent_job_id == parent_job_id, Job.status.in_(PENDING_STATUSES))
        async with self._transaction(write=False) as session:
            return (await session.scalars(query.order_by(Job.id.desc()))).first()

    async def enqueue_followup(
        self,
        parent_job_id: int,
        kind: JobKind,
        *,
        max_pending: int,
        max_pending_per_conversation: int,
        max_pending_per_user: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job answering the parent job's message again (`kind`), within the same bounds
        as a message (`QueueFull`, counted for the message's author). Returns (job, created): when
        a Regenerate or Continue of the same reply is already queued, running or answered, that
        job and False (two presses at once, from two members or two taps, queue one follow-up:
        the parent's row lock, or SQLite's write lock, serializes them). Claims the update being
        handled (`Repository.handling`) in the same transaction: `UpdateAlreadyHandled` when it
        was claimed before, and nothing is queued."""
        claim = self._claim_for(None)
        async with self._transaction(write=True) as session:
            parent = await self._require(session, Job, parent_job_id, lock=True)
            question = await session.get(Message, parent.message_id)
            await self._claim(session, claim)
            # A follow-up of this reply already waiting, running or answered (its reply replaced this one).
            earlier = await session.scalars(
                select(Job)
                .outerjoin(Message, Message.id == Job.reply_message_id)
                .where(
                    Job.parent_job_id == parent.id,
                    Job.status.in_(PENDING_STATUSES) | (Job.reply_message_id.is_not(None) & Message.archived.is_(False)),
                )
                .order_by(Job.id.desc())
            )
            existing = earlier.first()
            if existing is not None:
                return existing, False
            if self._dialect(session) == "postgresql":
                await session.execute(select(func.pg_advisory_xact_lock(_ENQUEUE_LOCK_KEY)))
            author_id = question.author_id if question is not None else ""
            waiting_here = await self._count_pending(session, parent.conversation_id)
            waiting_total = await self._count_pending(session, None)
            if max_pending_per_user is not None:
                waiting_yours = await self._count_pending_for_author(session, parent.conversation_id, author_id)
                if waiting_yours >= max_pending_per_user:
                    raise QueueFull(QueueLimit.USER, waiting_yours, max_pending_per_user)
            if waiting_here >= max_pending_per_conversation:
                raise QueueFull(QueueLimit.CONVERSATION, waiting_here, max_pending_per_conversation)
            if waiting_total >= max_pending:
                raise QueueFull(QueueLimit.TOTAL, waiting_total, max_pending)
            job = Job(
                conversation_id=parent.conversation_id,
                message_id=parent.message_id,
                status=JobStatus.QUEUED,
                kind=kind.value,
                parent_job_id=parent.id,
            )
            session.add(job)
            await session.flush()
            await session.refresh(job)
            return job, True

    async def stop_job(self, job_id: int) -> bool:
        """The Stop control: queued/running → cancelled (the process running it notices, see
        `reset_conversation`), claiming the update being handled in the same transaction. False
        (and nothing claimed) when the job had already ended."""
        claim = self._claim_for(None)
        async with self._transaction(write=True) as session:
            changed = await self._set_status(
                session,
                (Job.id == job_id, Job.status.in_(PENDING_STATUSES)),
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
            )
            if changed:
                await self._claim(session, claim)
            return bool(changed)

    async def set_shown_text(self, job_id: int, text: str) -> None:
        """Remember what a streaming reply has shown so far, so an attempt after a crash goes on
        from it. Only the job's owner may: `JobNotOwned` otherwise (its attempt must stop)."""
        async with self._transaction(write=True) as session:
            changed = await self._set_status(session, (Job.id == job_id, Job.owner == self.owner), shown_text=text)
            if not changed:
                await self._require(session, Job, job_id)
                raise JobNotOwned(f"job {job_id} is no longer owned by this process ({self.owner})")

    async def previous_reply_ids(self, conversation_id: int, before_job_id: int, keep: Sequence[str] = ()) -> list[str]:
        """The platform messages of the newest reply posted before job `before_job_id` in the
        conversation (whose controls a newer reply retires), less those in `keep`."""
        query = (
            select(Job.reply_platform_ids)
            .where(Job.conversation_id == conversation_id, Job.id < before_job_id, Job.reply_platform_ids.is_not(None))
            .order_by(Job.id.desc())
            .limit(8)
        )
        async with self._transaction(write=False) as session:
            newest = next((ids for ids in (await session.scalars(query)).all() if ids), [])
        return [str(i) for i in newest if str(i) not in set(keep)]

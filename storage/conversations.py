"""Storage of conversations, their messages and the admin audit trail.

Every method is one transaction of its own. Results are ORM objects of `storage.models`, loaded
completely and detached from their session (`expire_on_commit=False`): read them freely, but
changing an attribute changes nothing in the database — call a method here instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.contracts import QueueLimit
from bot.core.errors import QueueFull
from bot.core.types import ConversationKey, JobStatus, Role
from storage.base import (
    _ENQUEUE_LOCK_KEY,
    GENERATION_KEYS,
    UNCHANGED,
    RepositoryBase,
    Unchanged,
)
from storage.models import AuditEntry, Conversation, Job, Message, utcnow

__all__ = ["ConversationRecords"]


class ConversationRecords(RepositoryBase):
    """Conversations, messages (recorded, edited, archived, forgotten) and the audit trail."""

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

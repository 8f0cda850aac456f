"""Storage of conversations, their messages and the admin audit trail.

Every method is one transaction of its own. The admin changes (reset, system prompt, settings,
forget) take the platform update that asked for them (`handled=`, else the one
`Repository.handling` names): the change, its audit row and the record of that update commit
together, and an update handled before raises `UpdateAlreadyHandled` and changes nothing. Results are ORM objects of `storage.models`, loaded
completely and detached from their session (`expire_on_commit=False`): read them freely, but
changing an attribute changes nothing in the database — call a method here instead.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import event, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.contracts import QueueLimit
from bot.core.errors import QueueFull
from bot.core.types import ConversationKey, JobStatus, Role
from storage.base import (
    _ENQUEUE_LOCK_KEY,
    GENERATION_KEYS,
    UNCHANGED,
    Unchanged,
)
from storage.models import AuditEntry, Conversation, Job, Message, utcnow
from storage.updates import HandledUpdate, HandledUpdates, UpdateClaim

__all__ = ["ConversationRecords"]


HISTORY_TRIM_STEPS = 4
"""`prompt_history` cuts history on a grid of `max_chars // HISTORY_TRIM_STEPS` characters."""


def _history_chars(message: Message, message_chars: int) -> int:
    """What a message costs in `prompt_history`'s bound (the SQL sum in `_cut_on_grid` counts the same)."""
    return len(message.text) + len(message.author_name) + message_chars


class ConversationRecords(HandledUpdates):
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

    async def set_system_prompt(
        self, conversation_id: int, text: str | None, *, handled: HandledUpdate | None = None
    ) -> Conversation:
        """Set the conversation's system prompt; None returns it to the configured default."""
        claim = self._claim_for(handled)
        return await self._update_conversation(conversation_id, {"system_prompt": text}, claim, "system", repr(text))

    async def set_generation(
        self, conversation_id: int, *, handled: HandledUpdate | None = None, **values: float | int | None
    ) -> Conversation:
        """Set any of temperature, top_p, max_new_tokens (None: back to the configured default).

        Ranges are the caller's to check (`bot.types.SETTING_RANGES`); unknown keys are a `ValueError`.
        """
        unknown = set(values) - GENERATION_KEYS
        if unknown:
            raise ValueError(
                f"unknown generation setting(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(GENERATION_KEYS))}"
            )
        detail = " ".join(f"{key}={value}" for key, value in values.items())
        return await self._update_conversation(conversation_id, values, self._claim_for(handled), "set", detail)

    async def _update_conversation(
        self, conversation_id: int, values: dict[str, Any], claim: UpdateClaim | None, action: str, detail: str
    ) -> Conversation:
        async with self._transaction(write=True) as session:
            conversation = await self._require(session, Conversation, conversation_id)
            before = {key: getattr(conversation, key) for key in values}
            written: list[AuditEntry] = []
            keep = lambda _session, row: written.append(row) if isinstance(row, AuditEntry) else None  # noqa: E731
            event.listen(session.sync_session, "pending_to_persistent", keep)
            try:
                await self._claim(session, claim, conversation_id=conversation_id, action=action, detail=detail)
            finally:
                event.remove(session.sync_session, "pending_to_persistent", keep)
            await self._record_audit_values(session, written, before, values)
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
        self,
        conversation_id: int,
        *,
        system_prompt: str | None | Unchanged = UNCHANGED,
        handled: HandledUpdate | None = None,
    ) -> tuple[int, list[int]]:
        """Archive every message and cancel the conversation's queued and running jobs, in one
        transaction.

        Returns (messages archived, ids of the cancelled jobs). A running job's cancellation is
        its stored status: the process running it (any process) notices, stops the generation and
        stores no reply. With `system_prompt` (a text, or None for the configured default), the
        prompt is replaced in the same transaction.
        """
        claim = self._claim_for(handled)
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
                (Job.conversation_id == conversation_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))),
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
            detail = f"archived={archived.rowcount} cancelled={len(cancelled)}"
            detail += f" system={system_prompt!r}" if system_prompt is not UNCHANGED else ""
            await self._claim(session, claim, conversation_id=conversation_id, action="reset", detail=detail)
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

    async def forget_author(
        self, conversation_id: int, author_id: str, *, handled: HandledUpdate | None = None
    ) -> tuple[int, list[int]]:
        """`/forget`: archive everything `author_id` wrote in the conversation and the bot's replies
        to it, and cancel their queued and running jobs (see `reset_conversation`), in one
        transaction. Returns (archived, cancelled ids)."""
        claim = self._claim_for(handled)
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
                [Job.message_id.in_(theirs), Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))],
                status=JobStatus.CANCELLED,
                finished_at=utcnow(),
            )
            detail = f"archived={result.rowcount} cancelled={len(cancelled)}"
            await self._claim(session, claim, conversation_id=conversation_id, action="forget", detail=detail)
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

    async def prompt_history(
        self,
        conversation_id: int,
        *,
        up_to_message_id: int,
        max_chars: int,
        message_chars: int = 16,
    ) -> list[Message]:
        """What a job answering `up_to_message_id` shows the model: the newest messages since the
        last reset, up to and including that one, as many as fit `max_chars`, oldest first.

        Each message costs its text, its author's name and `message_chars`; the newest is always
        kept. Rows are read newest first, in pages, so a job reads about what it keeps however
        long the conversation is. Each reply the bot finished sits right after the question it
        answers (linked by its job), also one stored after `up_to_message_id` came in (a quick
        second question sees the answer to the first); replies to later questions stay out.
        Where older messages were left out, the history does not open with a reply.

        Cuts are stable, so consecutive turns show the model the same first message (and the
        worker's prefix cache can reuse the prompt): positions are counted in characters from the
        conversation's first message since the reset, on a grid `max_chars // HISTORY_TRIM_STEPS`
        apart, and the history starts at the first message past the first grid line from which
        on everything fits. It stays there turn after turn until that no longer fits, then moves
        on by about a quarter of `max_chars` at once, instead of by a message each turn.
        """
        async with self._transaction(write=False) as session:
            kept: list[Message] = []
            used = 0
            upper = up_to_message_id
            page_size = 64
            cut: Message | None = None  # the newest message that did not fit
            while cut is None:
                query = (
                    select(Message)
                    .where(
                        Message.conversation_id == conversation_id,
                        Message.archived.is_(False),
                        Message.id <= upper,
                    )
                    .order_by(Message.id.desc())
                    .limit(page_size)
                )
                page = list((await session.scalars(query)).all())
                for message in page:
                    cost = _history_chars(message, message_chars)
                    if kept and used + cost > max_chars:
                        cut = message
                        break
                    kept.append(message)
                    used += cost
                if len(page) < page_size:
                    break
                upper = page[-1].id - 1
                # The next page: about as many rows as the budget left holds at the size seen so far.
                average = used / len(kept)
                page_size = min(512, max(16, int((max_chars - used) / average * 1.25) + 8))
            if not kept:
                return []
            if cut is not None:
                kept = await self._cut_on_grid(session, conversation_id, kept, cut, max_chars, message_chars)
            # The bot's replies to the questions in that window: their questions place them.
            replies = await session.execute(
                select(Job.message_id, Message)
                .join(Message, Message.id == Job.reply_message_id)
                .where(
                    Job.conversation_id == conversation_id,
                    Job.message_id >= kept[-1].id,
                    Job.message_id < up_to_message_id,
                    Message.archived.is_(False),
                )
            )
            question_of: dict[int, int] = {}
            by_id = {message.id: message for message in kept}
            for question_id, reply in replies.all():
                question_of[reply.id] = question_id
                by_id.setdefault(reply.id, reply)
        ordered = sorted(
            by_id.values(),
            key=lambda m: (question_of[m.id], 1, m.id) if m.id in question_of else (m.id, 0, m.id),
        )
        if cut is not None:
            while len(ordered) > 1 and ordered[0].role == Role.ASSISTANT:
                ordered.pop(0)
        return ordered

    @staticmethod
    async def _cut_on_grid(
        session: AsyncSession,
        conversation_id: int,
        kept: list[Message],
        cut: Message,
        max_chars: int,
        message_chars: int,
    ) -> list[Message]:
        """`kept` (newest first, all that fits after `cut`) from its first message past the next
        grid line after `cut`'s position on: a position depends only on the messages before it,
        so the same message is chosen turn after turn (see `prompt_history`)."""
        before_cut = await session.scalar(
            select(
                func.coalesce(
                    func.sum(func.length(Message.text) + func.length(Message.author_name) + message_chars), 0
                )
            ).where(
                Message.conversation_id == conversation_id,
                Message.archived.is_(False),
                Message.id < cut.id,
            )
        )
        step = max(1, max_chars // HISTORY_TRIM_STEPS)
        line = (int(before_cut or 0) // step + 1) * step
        position = int(before_cut or 0) + _history_chars(cut, message_chars)
        for index in range(len(kept) - 1, 0, -1):  # oldest first; the newest is always kept
            if position >= line:
                return kept[: index + 1]
            position += _history_chars(kept[index], message_chars)
        return kept[:1]

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
        """Write down one admin action on its own (the admin changes above write theirs themselves)."""
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

    async def recent_audit(
        self,
        conversation_id: int | None = None,
        *,
        limit: int | None = 10,
        since: datetime | None = None,
        actions_except: tuple[str, ...] = (),
    ) -> list[tuple[AuditEntry, Conversation]]:
        """The newest admin actions (of one conversation, or everywhere), newest first, each
        with its conversation: `/audit` and `parley audit` read them."""
        query = select(AuditEntry, Conversation).join(Conversation, Conversation.id == AuditEntry.conversation_id)
        if conversation_id is not None:
            query = query.where(AuditEntry.conversation_id == conversation_id)
        if since is not None:
            query = query.where(AuditEntry.created_at >= since)
        if actions_except:
            query = query.where(AuditEntry.action.not_in(actions_except))
        query = query.order_by(AuditEntry.id.desc())
        if limit is not None:
            query = query.limit(limit)
        async with self._transaction(write=False) as session:
            return [(entry, conversation) for entry, conversation in (await session.execute(query)).all()]

    async def last_action_by(self, platform: str, actor_id: str, action: str) -> datetime | None:
        """When `actor_id` of `platform` last did `action` (in any conversation); None if never."""
        query = (
            select(func.max(AuditEntry.created_at))
            .where(AuditEntry.platform == platform, AuditEntry.actor_id == actor_id, AuditEntry.action == action)
        )
        async with self._transaction(write=False) as session:
            newest = await session.scalar(query)
        if newest is not None and newest.tzinfo is None:  # SQLite's MAX() returns the stored naive UTC
            newest = newest.replace(tzinfo=timezone.utc)
        return newest

    @staticmethod
    async def _record_audit_values(
        session: AsyncSession, written: list[AuditEntry], before: dict[str, Any], after: dict[str, Any]
    ) -> None:
        """Inside a change's transaction: give the audit row its claim just wrote the values the
        change replaced and set, as JSON."""
        if len(written) != 1:
            return  # no claim (a change made outside an update), so no audit row to complete
        [entry] = written
        single = len(after) == 1 and "system_prompt" in after
        entry.old_value = json.dumps(before["system_prompt"] if single else before)
        entry.new_value = json.dumps(after["system_prompt"] if single else after)
        await session.flush()

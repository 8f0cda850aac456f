"""Platform updates already handled: the record that makes an update delivered again change nothing.

A platform may deliver an update twice (Telegram sends a batch again when the bot crashed before
confirming it). Messages are recorded once by their platform id; commands and notices are not
messages, so their updates are written down here. An admin change, its audit row and the record
of its update are one transaction: the changing methods of `storage.conversations` claim the
update they are given, or the one `Repository.handling` names for the running task (so layers
that know nothing of updates, such as the job queue, still pass it on), and raise
`UpdateAlreadyHandled` without changing anything when it was claimed before. Read-only commands
and notices claim theirs with `mark_handled`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.core.errors import UpdateAlreadyHandled
from bot.core.types import IncomingMessage
from storage.base import RepositoryBase
from storage.models import AuditEntry, HandledUpdateEntry, utcnow

__all__ = ["HandledUpdate", "HandledUpdates", "UpdateClaim", "UpdateSource", "HANDLED_UPDATES_KEPT"]

HANDLED_UPDATES_KEPT: Final = timedelta(days=7)
"""How long the record of a handled update is kept; platforms redeliver within a day (Telegram
keeps an unconfirmed update for 24 hours)."""

_PRUNE_EVERY = 500  # claims between two prunings, per process


@dataclass(frozen=True, slots=True)
class HandledUpdate:
    """One platform update: where it came from (platform, conversation key, the platform's id of
    its message, unique in that conversation) and who sent it (for the audit row of a change)."""

    platform: str
    conversation: str
    update_id: str
    actor_id: str = ""
    actor_name: str = ""

    @classmethod
    def of(cls, source: UpdateSource) -> HandledUpdate:
        """The update that delivered `source` (an incoming message: its conversation, id and author)."""
        if isinstance(source, HandledUpdate):
            return source
        key = source.conversation
        return cls(key.platform, key.key, source.message_id, source.author.id, source.author.name)


UpdateSource = HandledUpdate | IncomingMessage
"""What the methods here take: an update, or the incoming message it delivered."""


@dataclass(slots=True)
class UpdateClaim:
    """An update being handled, and whether a change has claimed it yet."""

    update: HandledUpdate
    claimed: bool = field(default=False)


_current: ContextVar[UpdateClaim | None] = ContextVar("parley_handled_update", default=None)


class HandledUpdates(RepositoryBase):
    """The record of handled updates, and the claim the admin changes make inside their transaction."""

    _claims_since_prune = 0

    @contextmanager
    def handling(self, update: UpdateSource) -> Iterator[UpdateClaim]:
        """Within the block, admin changes made by this task claim `update` in their transaction;
        the claim says afterwards whether one did."""
        claim = UpdateClaim(HandledUpdate.of(update))
        token = _current.set(claim)
        try:
            yield claim
        finally:
            _current.reset(token)

    async def was_handled(self, update: UpdateSource) -> bool:
        """Whether `update` was handled before (a change or `mark_handled` recorded it)."""
        update = HandledUpdate.of(update)
        async with self._transaction(write=False) as session:
            return (await session.scalar(select(HandledUpdateEntry.id).where(*self._matching(update)))) is not None

    async def mark_handled(self, update: UpdateSource) -> bool:
        """Record that `update` was handled; False when it had been already (then do nothing)."""
        try:
            async with self._transaction(write=True) as session:
                await self._claim(session, UpdateClaim(HandledUpdate.of(update)))
        except UpdateAlreadyHandled:
            return False
        await self._maybe_prune()
        return True

    async def prune_handled_updates(self, *, older_than: timedelta = HANDLED_UPDATES_KEPT) -> int:
        """Forget the records of updates handled more than `older_than` ago; how many went."""
        async with self._transaction(write=True) as session:
            result = await session.execute(
                delete(HandledUpdateEntry)
                .where(HandledUpdateEntry.created_at < utcnow() - older_than)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount

    # -- for the changing methods ----------------------------------------------------------------

    @staticmethod
    def _claim_for(handled: HandledUpdate | None) -> UpdateClaim | None:
        """The claim a change makes: of the update it was given, else of the one being handled here."""
        return UpdateClaim(handled) if handled is not None else _current.get()

    async def _claim(
        self,
        session: AsyncSession,
        claim: UpdateClaim | None,
        *,
        conversation_id: int | None = None,
        action: str = "",
        detail: str = "",
    ) -> None:
        """Inside a change's transaction: record its update (raising `UpdateAlreadyHandled` if it
        was recorded before, which rolls the change back) and, with an `action`, its audit row."""
        if claim is None:
            return
        update = claim.update
        values = {"platform": update.platform, "conversation_key": update.conversation, "update_id": update.update_id}
        insert = self._insert(session, HandledUpdateEntry)
        if insert is not None:
            statement = insert.values(**values, created_at=utcnow()).on_conflict_do_nothing(
                index_elements=["platform", "conversation_key", "update_id"]
            )
            inserted = (await session.scalars(statement.returning(HandledUpdateEntry.id))).first() is not None
        else:  # no ON CONFLICT: insert in a savepoint
            try:
                async with session.begin_nested():
                    session.add(HandledUpdateEntry(**values))
                inserted = True
            except IntegrityError:
                inserted = False
        if not inserted:
            raise UpdateAlreadyHandled(f"{update.platform} update {update.update_id} in {update.conversation}")
        if action and conversation_id is not None:
            session.add(
                AuditEntry(
                    conversation_id=conversation_id,
                    platform=update.platform,
                    actor_id=update.actor_id,
                    actor_name=update.actor_name,
                    action=action,
                    detail=detail,
                )
            )
            await session.flush()
        claim.claimed = True
        self._claims_since_prune += 1

    async def _maybe_prune(self) -> None:
        if self._claims_since_prune >= _PRUNE_EVERY:
            self._claims_since_prune = 0
            await self.prune_handled_updates()

    @staticmethod
    def _matching(update: HandledUpdate) -> tuple:
        return (
            HandledUpdateEntry.platform == update.platform,
            HandledUpdateEntry.conversation_key == update.conversation,
            HandledUpdateEntry.update_id == update.update_id,
        )

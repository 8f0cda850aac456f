"""Reading what conversations storage holds, for adapters catching up on what they missed.

Every method is one transaction of its own and returns plain values (`bot.core.contracts`), not
ORM rows.
"""

from __future__ import annotations

from sqlalchemy import func, select

from bot.core.contracts import KnownConversation
from bot.core.types import ConversationKey, Role
from storage.base import RepositoryBase
from storage.models import Conversation, Message

__all__ = ["ConversationCatalog"]


class ConversationCatalog(RepositoryBase):
    """The conversations of a platform, with when the newest message people sent there was sent."""

    async def conversations_on(self, platform: str) -> list[KnownConversation]:
        """Every conversation stored for `platform` (archived messages count: they were seen)."""
        newest = func.max(Message.created_at)
        query = (
            select(Conversation.key, Conversation.is_direct, newest)
            .outerjoin(Message, (Message.conversation_id == Conversation.id) & (Message.role == Role.USER))
            .where(Conversation.platform == platform)
            .group_by(Conversation.id, Conversation.key, Conversation.is_direct)
            .order_by(Conversation.id)
        )
        async with self._transaction(write=False) as session:
            rows = (await session.execute(query)).all()
        return [KnownConversation(ConversationKey(platform, key), bool(direct), last) for key, direct, last in rows]

"""A person's own data: what `/export` hands them, and deleting a whole conversation.

`author_exchanges` reads one author's messages in a conversation (archived ones too: they are
still stored) with the bot's reply to each; `delete_conversation` removes a conversation and
everything stored for it (messages, jobs, audit rows, handled-update records).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import aliased

from bot.core.types import ConversationKey, Role
from storage.base import RepositoryBase
from storage.models import AuditEntry, Conversation, HandledUpdateEntry, Job, Message

__all__ = ["PersonalData", "Exchange", "DeletedConversation"]


@dataclass(frozen=True, slots=True)
class Exchange:
    """One message of the author's and the bot's reply to it (None when it got none)."""

    message: Message
    reply: Message | None


@dataclass(frozen=True, slots=True)
class DeletedConversation:
    messages: int
    jobs: int
    audit_entries: int


class PersonalData(RepositoryBase):
    """What `/export` and `parley forget-conversation` read and delete."""

    async def author_exchanges(self, conversation_id: int, author_id: str) -> list[Exchange]:
        """Everything `author_id` wrote in the conversation, oldest first, each with the reply
        the bot stored for it (the newest job's, if it was answered more than once)."""
        reply = aliased(Message)
        query = (
            select(Message, reply)
            .outerjoin(Job, Job.message_id == Message.id)
            .outerjoin(reply, reply.id == Job.reply_message_id)
            .where(Message.conversation_id == conversation_id, Message.author_id == author_id, Message.role == Role.USER)
            .order_by(Message.id, Job.id)
        )
        async with self._transaction(write=False) as session:
            rows = (await session.execute(query)).all()
        exchanges: dict[int, Exchange] = {}
        for message, answer in rows:
            known = exchanges.get(message.id)
            if known is None or answer is not None:
                exchanges[message.id] = Exchange(message, answer if answer is not None else (known.reply if known else None))
        return list(exchanges.values())

    async def delete_conversation(self, key: ConversationKey) -> DeletedConversation | None:
        """Delete the conversation and everything stored for it, in one transaction; None when
        there is no such conversation."""
        async with self._transaction(write=True) as session:
            conversation = (
                await session.scalars(
                    select(Conversation).where(Conversation.platform == key.platform, Conversation.key == key.key)
                )
            ).one_or_none()
            if conversation is None:
                return None
            where = conversation.id
            jobs = await session.execute(delete(Job).where(Job.conversation_id == where))
            audit = await session.execute(delete(AuditEntry).where(AuditEntry.conversation_id == where))
            messages = await session.execute(delete(Message).where(Message.conversation_id == where))
            await session.execute(
                delete(HandledUpdateEntry).where(
                    HandledUpdateEntry.platform == key.platform, HandledUpdateEntry.conversation_key == key.key
                )
            )
            await session.execute(delete(Conversation).where(Conversation.id == where))
            return DeletedConversation(messages=messages.rowcount, jobs=jobs.rowcount, audit_entries=audit.rowcount)

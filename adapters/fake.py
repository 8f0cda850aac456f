"""FakeAdapter: a platform that lives in memory, for tests and benchmarks.

It is a real adapter (the queue opens reply streams on it, the router gets its messages); only
the far end, the people, are simulated: `say()` sends a message as a user, `replies` holds what
the bot showed. Core tests read like conversations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.core.contracts import Attachment
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Adapter, Core, ReplyStream

__all__ = ["FakeAdapter", "FakeReply"]


@dataclass
class FakeReply:
    conversation: ConversationKey
    reply_to: str | None
    updates: list[str] = field(default_factory=list)
    text: str | None = None
    failed: str | None = None
    message_id: str = ""

    @property
    def done(self) -> bool:
        return self.text is not None or self.failed is not None


class _FakeStream(ReplyStream):
    def __init__(self, reply: FakeReply) -> None:
        self.reply = reply

    async def update(self, text: str) -> None:
        first = not self.posted_ids
        self.reply.updates.append(text)
        if first:
            await self.report_posted()

    async def finish(self, text: str) -> list[str]:
        first = not self.posted_ids
        self.reply.text = text
        if first:
            await self.report_posted()
        return [self.reply.message_id]

    async def fail(self, notice: str) -> None:
        self.reply.failed = notice

    @property
    def posted_ids(self) -> list[str]:
        return [self.reply.message_id] if self.reply.updates or self.reply.done else []


class FakeAdapter(Adapter):
    """An in-memory platform; `platform` defaults to "fake"."""

    max_message_length = 2000
    edit_interval = 0.0

    def __init__(self, platform: str = "fake") -> None:
        self.platform = platform
        self.core: Core | None = None
        self.replies: list[FakeReply] = []
        self.files: list[tuple[ConversationKey, Attachment]] = []
        """Files the bot answered with (`/export`), as delivered by `say`."""
        self.online = True
        """What `connected` reports (tests turn it off to see /readyz fail)."""
        self._ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        return self.online and self.core is not None

    async def start(self, core: Core) -> None:
        self.core = core

    async def stop(self) -> None:
        self.core = None

    async def open_reply(
        self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()
    ) -> ReplyStream:
        reply = FakeReply(conversation, reply_to, message_id=resume[0] if resume else f"bot-{next(self._ids)}")
        self.replies.append(reply)
        return _FakeStream(reply)

    def message(
        self,
        text: str,
        *,
        chat: str = "chat",
        user: str = "alice",
        admin: bool = False,
        direct: bool = False,
        addressed: bool = True,
        message_id: str | None = None,
        is_bot: bool = False,
    ) -> IncomingMessage:
        return IncomingMessage(
            conversation=ConversationKey(self.platform, chat),
            message_id=message_id or f"m-{next(self._ids)}",
            author=Author(id=user, name=user.capitalize(), is_admin=admin, is_bot=is_bot),
            text=text,
            is_direct=direct,
            addressed=addressed,
        )

    async def say(self, text: str, **kwargs: object):  # noqa: ANN201 - RouteResult
        """Send `text` as a user (see `message` for the options); returns the router's result."""
        assert self.core is not None, "start the app first"
        message = self.message(text, **kwargs)  # type: ignore[arg-type]
        result = await self.core.handle(message)
        if result.attachment is not None:
            self.files.append((message.conversation, result.attachment))
        return result

    def replies_in(self, chat: str) -> list[FakeReply]:
        return [r for r in self.replies if r.conversation.key == chat]

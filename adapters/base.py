"""The small base every platform adapter implements.

An adapter converts platform events into `IncomingMessage`s, hands them to the core
(`Core.handle`), and shows replies: plain command answers through `RouteResult.reply`, generated
replies through a `ReplyStream` the generation queue opens with `open_reply`.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bot.router import RouteResult
    from bot.types import ConversationKey, IncomingMessage

__all__ = ["Adapter", "ReplyStream", "Core", "split_message"]


class Core(Protocol):
    """What an adapter may ask of Parley's core (implemented by `bot.router.Router`)."""

    async def handle(self, message: IncomingMessage) -> RouteResult: ...

    async def handle_edit(self, message: IncomingMessage) -> bool: ...

    async def wait_for(self, job_id: int) -> str: ...

    def set_bot_username(self, platform: str, username: str) -> None: ...


class ReplyStream(abc.ABC):
    """One generated reply on its way to the platform.

    `update` gets the whole text so far (not a delta) and may be called often: the adapter
    throttles edits to its platform's rate. `finish` shows the final text and returns the
    platform ids of the messages it used. `fail` replaces the reply with an error notice.
    """

    @abc.abstractmethod
    async def update(self, text: str) -> None: ...

    @abc.abstractmethod
    async def finish(self, text: str) -> list[str]: ...

    @abc.abstractmethod
    async def fail(self, notice: str) -> None: ...


class Adapter(abc.ABC):
    """A platform. Long-lived: `start(core)` then `stop()`; nothing connects at construction."""

    platform: str = ""
    max_message_length: int = 4000
    edit_interval: float = 1.0

    @abc.abstractmethod
    async def start(self, core: Core) -> None:
        """Connect and begin delivering messages to `core.handle`."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect; pending replies are left to the queue (they are persisted)."""

    @abc.abstractmethod
    async def open_reply(self, conversation: ConversationKey, reply_to: str | None) -> ReplyStream:
        """Begin a generated reply in `conversation`, answering message `reply_to` when given."""

    async def send(self, conversation: ConversationKey, text: str, reply_to: str | None = None) -> list[str]:
        """Send a plain message (a notice); the default goes through a reply stream."""
        stream = await self.open_reply(conversation, reply_to)
        return await stream.finish(text)


def split_message(text: str, limit: int) -> list[str]:
    """Split text into chunks of at most `limit` characters, at a paragraph, line, sentence or word
    boundary when there is one; only whitespace at a cut is dropped."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        window = rest[:limit]
        cut = -1
        for sep in ("\n\n", "\n", ". ", "! ", "? ", " "):
            at = window.rfind(sep)
            if at > limit // 4:
                cut = at + len(sep)
                break
        if cut <= 0:
            cut = limit
        chunks.append(rest[:cut].rstrip() or rest[:cut])
        rest = rest[cut:]
    if rest or not chunks:
        chunks.append(rest)
    return chunks

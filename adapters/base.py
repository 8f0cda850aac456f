"""What platform adapters share beyond the core's contracts (`bot.core.contracts`): splitting
text at a platform's length limit without breaking code blocks, throttled edits, and a reply
stream for platforms that edit messages as the text grows."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Sequence

from bot.core.contracts import Adapter, Core, ReplyStream

__all__ = ["Adapter", "ReplyStream", "EditingReplyStream", "EditThrottle", "Core", "split_message", "split_markdown"]


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


FENCE = "```"


def split_markdown(text: str, limit: int) -> list[str]:
    """`split_message` that never leaves a fenced code block open across a cut: the block is
    closed at the end of one chunk and reopened (same language) at the start of the next."""
    if len(text) <= limit:
        return [text]
    reserve = 20  # a closing fence, and a reopening fence with a language tag of up to 12 letters
    out: list[str] = []
    reopen = ""
    for chunk in split_message(text, max(limit - reserve, 1)):
        body = reopen + chunk
        reopen = ""
        if body.count(FENCE) % 2:  # the last fence opened a block that this chunk does not close
            tag = body[body.rfind(FENCE) + len(FENCE) :].split("\n", 1)[0].strip()
            language = tag if tag.isidentifier() and len(tag) <= 12 else ""
            body += "\n" + FENCE
            reopen = f"{FENCE}{language}\n"
        out.append(body)
    return out


class EditThrottle:
    """Spaces edits to at most one per `interval` seconds per key (a chat or channel), however many
    replies stream there at once."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[object, float] = {}

    def reserve(self, key: object) -> float:
        """Seconds to wait before this key's next edit; the slot is taken."""
        now = time.monotonic()
        slot = max(now, self._next.get(key, 0.0))
        self._next[key] = slot + self.interval
        return slot - now


class EditingReplyStream(ReplyStream):
    """A reply shown as it is generated, for platforms that edit messages: the first text is sent
    at once, later text by throttled edits, and text past the platform's length limit continues in
    further messages. Subclasses say how to split, send and edit."""

    def __init__(self, throttle: EditThrottle, throttle_key: object, resume: Sequence[str] = ()) -> None:
        self.throttle = throttle
        self.throttle_key = throttle_key
        # (platform message id, text shown); messages of an interrupted attempt are edited over.
        self.messages: list[tuple[object, str]] = [(message_id, "") for message_id in resume]
        self.latest = ""
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task | None = None

    @property
    def posted_ids(self) -> list[str]:
        return [str(message_id) for message_id, _ in self.messages]

    @abc.abstractmethod
    def split(self, text: str) -> list[str]: ...

    @abc.abstractmethod
    async def send(self, chunk: str, index: int) -> object:
        """Send chunk number `index` as a new message; return its platform id."""

    @abc.abstractmethod
    async def edit(self, message_id: object, chunk: str) -> None: ...

    async def update(self, text: str) -> None:
        self.latest = text
        if not self.messages:
            async with self._lock:
                if not self.messages:
                    await self._render(text)
            return
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._render_later())

    async def finish(self, text: str) -> list[str]:
        await self._cancel_pending()
        async with self._lock:
            await self._render(text)
        return self.posted_ids

    async def fail(self, notice: str) -> None:
        await self._cancel_pending()
        async with self._lock:
            shown = self.messages[-1][1] if self.messages else ""
            if shown:
                await self._render_from(len(self.messages) - 1, f"{shown}\n\n{notice}")
            else:
                await self._render(notice)

    async def _render_later(self) -> None:
        await asyncio.sleep(self.throttle.reserve(self.throttle_key))
        async with self._lock:
            await self._render(self.latest)

    async def _cancel_pending(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)

    async def _render(self, text: str) -> None:
        await self._render_from(0, text)

    async def _render_from(self, start: int, text: str) -> None:
        chunks = [chunk for chunk in self.split(text) if chunk.strip()]
        for offset, chunk in enumerate(chunks):
            index = start + offset
            if index < len(self.messages):
                message_id, shown = self.messages[index]
                if shown != chunk:
                    await self.edit(message_id, chunk)
                    self.messages[index] = (message_id, chunk)
            else:
                self.messages.append((await self.send(chunk, index), chunk))
        for index in range(start + len(chunks), len(self.messages)):
            message_id, shown = self.messages[index]
            if shown != "…":  # left over from an interrupted, longer attempt
                await self.edit(message_id, "…")
                self.messages[index] = (message_id, "…")

"""What platform adapters share beyond the core's contracts (`bot.core.contracts`): splitting
text at a platform's length limit without breaking code blocks, throttled edits, and a reply
stream for platforms that edit messages as the text grows."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from bot.core.contracts import Adapter, Core, ReplyStream

__all__ = ["Adapter", "ReplyStream", "EditingReplyStream", "EditThrottle", "Core", "split_message", "split_markdown"]

log = logging.getLogger("parley.adapters")
T = TypeVar("T")


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
    further messages. Subclasses say how to split, send and edit.

    Each posted id is kept and reported (`on_posted`) before the next send. A render that has begun
    is never cancelled (the platform may have posted a message whose id is on its way): `finish`
    and `fail` wait for it, and drop only a render still waiting out the edit interval. While
    streaming, a refused call is logged and the next render tries again; the final render retries
    with backoff (`retry_delays`) and, when a message keeps refusing edits, posts the text from
    there on as new messages.
    """

    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Seconds between the tries of a final edit or send."""

    def __init__(self, throttle: EditThrottle, throttle_key: object, resume: Sequence[str] = ()) -> None:
        self.throttle = throttle
        self.throttle_key = throttle_key
        # (platform message id, text shown); messages of an interrupted attempt are edited over.
        self.messages: list[tuple[object, str]] = [(message_id, "") for message_id in resume]
        self.superseded: list[object] = []
        """Messages given up on: they refused edits, and what they should show was posted anew."""
        self.latest = ""
        self._lock = asyncio.Lock()
        self._pending: asyncio.Task | None = None
        self._rendering = False  # the pending render is past its wait: it runs to its end
        self._refused = False  # a render failed: later ones wait for the edit interval

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
        if not self.messages and not self._refused:
            async with self._lock:
                if not self.messages:
                    await self._render_while_streaming(text)
            return
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._render_later())

    async def finish(self, text: str) -> list[str]:
        await self._settle_pending()
        async with self._lock:
            await self._render_from(0, text, final=True)
        return self.posted_ids

    async def fail(self, notice: str) -> None:
        await self._settle_pending()
        async with self._lock:
            shown = self.messages[-1][1] if self.messages else ""
            if shown:
                await self._render_from(len(self.messages) - 1, f"{shown}\n\n{notice}", final=True)
            else:
                await self._render_from(0, notice, final=True)

    async def _render_later(self) -> None:
        self._rendering = False
        await asyncio.sleep(self.throttle.reserve(self.throttle_key))
        self._rendering = True
        async with self._lock:
            await self._render_while_streaming(self.latest)

    async def _render_while_streaming(self, text: str) -> None:
        try:
            # Saved before it is shown, so a reply cut by a crash goes on from at least this text.
            await self.report_render(text)
        except Exception as exc:  # noqa: BLE001 - storage down, or the job taken over: show nothing unsaved
            log.warning("a streaming render was skipped: its text could not be saved (%s: %s)", type(exc).__name__, exc)
            return
        try:
            await self._render_from(0, text, final=False)
            self._refused = False
        except Exception as exc:  # noqa: BLE001 - the platform's own errors; the next render tries again
            self._refused = True
            log.warning("could not update a streaming reply (%s: %s); trying again later", type(exc).__name__, exc)

    async def _settle_pending(self) -> None:
        """Let a render that has begun finish; drop one still waiting for its turn."""
        task = self._pending
        if task is None or task.done():
            return
        if not self._rendering:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _render_from(self, start: int, text: str, *, final: bool) -> None:
        chunks = [chunk for chunk in self.split(text) if chunk.strip()]
        for offset, chunk in enumerate(chunks):
            index = start + offset
            if index < len(self.messages):
                message_id, shown = self.messages[index]
                if shown == chunk:
                    continue
                if not final:
                    await self.edit(message_id, chunk)
                    self.messages[index] = (message_id, chunk)
                    continue
                try:
                    await self._retrying(lambda: self.edit(message_id, chunk))
                    self.messages[index] = (message_id, chunk)
                    continue
                except Exception as exc:  # noqa: BLE001 - refused for good: show it anew below
                    log.warning("a reply message kept refusing edits (%s: %s); posting the rest anew", type(exc).__name__, exc)
                    await self._supersede_from(index)
            if final:
                message_id = await self._retrying(lambda: self.send(chunk, index))
            else:
                message_id = await self.send(chunk, index)
            self.messages.append((message_id, chunk))
            await self.report_posted()
        for index in range(start + len(chunks), len(self.messages)):
            message_id, shown = self.messages[index]
            if shown == "…":
                continue
            # Left over from an interrupted, longer attempt: blanked if the platform lets us.
            try:
                await (self._retrying(lambda: self.edit(message_id, "…")) if final else self.edit(message_id, "…"))
                self.messages[index] = (message_id, "…")
            except Exception as exc:  # noqa: BLE001 - the text itself is shown above it
                if not final:
                    raise
                log.warning("could not blank a left-over reply message (%s: %s)", type(exc).__name__, exc)

    async def _supersede_from(self, index: int) -> None:
        """Give up on the messages from `index` on; what they should show is posted anew below
        them. Those after the refusing one are blanked if the platform lets us (one try)."""
        dropped = self.messages[index:]
        del self.messages[index:]
        self.superseded.extend(message_id for message_id, _ in dropped)
        for message_id, shown in dropped[1:]:
            if shown != "…":
                try:
                    await self.edit(message_id, "…")
                except Exception as exc:  # noqa: BLE001 - they only repeat part of the text
                    log.info("could not blank a superseded reply message (%s: %s)", type(exc).__name__, exc)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        for delay in self.retry_delays:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - the platform's own errors, tried again
                log.warning("a reply could not be shown (%s: %s); trying again in %.1f s", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
        return await call()

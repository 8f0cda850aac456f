"""FakeAdapter: a platform that lives in memory, for tests and benchmarks.

It is a real adapter (the queue opens reply streams on it, the router gets its messages); only
the far end, the people, are simulated: `say()` sends a message as a user, `replies` holds what
the bot showed. Core tests read like conversations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from bot.core.contracts import Attachment, Control, ControlPress
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
    resumed: bool = False
    """The reply was shown in a message posted before (a retry, a Regenerate, a Continue)."""
    job_id: int | None = None
    controls: tuple[Control, ...] = ()
    """The controls the message shows now (as last rendered, or cleared)."""
    control_history: list[tuple[Control, ...]] = field(default_factory=list)
    """Every change of `controls`, in order (renders and clearings)."""

    @property
    def done(self) -> bool:
        return self.text is not None or self.failed is not None

    def show_controls(self, controls: tuple[Control, ...]) -> None:
        if controls != self.controls or not self.control_history:
            self.control_history.append(controls)
        self.controls = controls


class _FakeStream(ReplyStream):
    def __init__(self, reply: FakeReply) -> None:
        self.reply = reply

    async def update(self, text: str) -> None:
        first = not self.posted_ids
        await self.report_render(text)
        self.reply.updates.append(text)
        self._render()
        if first:
            await self.report_posted()

    async def finish(self, text: str) -> list[str]:
        first = not self.posted_ids
        self.reply.text = text
        self._render()
        if first:
            await self.report_posted()
        return [self.reply.message_id]

    async def fail(self, notice: str) -> None:
        self.reply.failed = notice
        self.reply.show_controls(())

    def _render(self) -> None:
        self.reply.job_id = self.job_id
        self.reply.show_controls(self.controls)

    @property
    def posted_ids(self) -> list[str]:
        shown = self.reply.updates or self.reply.done or self.reply.resumed
        return [self.reply.message_id] if shown else []


class FakeAdapter(Adapter):
    """An in-memory platform; `platform` defaults to "fake"."""

    max_message_length = 2000
    edit_interval = 0.0
    supports_controls = True

    def __init__(self, platform: str = "fake") -> None:
        self.platform = platform
        self.core: Core | None = None
        self.replies: list[FakeReply] = []
        self.files: list[tuple[ConversationKey, Attachment]] = []
        """Files the bot answered with (`/export`), as delivered by `say`."""
        self.online = True
        """What `connected` reports (tests turn it off to see /readyz fail)."""
        self._ids = itertools.count(1)
        self.cleared: list[tuple[ConversationKey, tuple[str, ...]]] = []
        """Every `clear_controls` call: (conversation, message ids)."""

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
        reply = FakeReply(
            conversation, reply_to, message_id=resume[0] if resume else f"bot-{next(self._ids)}", resumed=bool(resume)
        )
        if resume:  # the message keeps what it showed until the new stream renders
            older = [r for r in self.replies if r.message_id == resume[0] and r.conversation == conversation]
            if older:
                reply.controls = older[-1].controls
        self.replies.append(reply)
        return _FakeStream(reply)

    async def clear_controls(self, conversation: ConversationKey, message_ids: Sequence[str]) -> None:
        self.cleared.append((conversation, tuple(message_ids)))
        for reply in self.replies:
            if reply.conversation == conversation and reply.message_id in message_ids:
                reply.show_controls(())

    def reply_of(self, job_id: int) -> FakeReply:
        """The newest reply stream opened for job `job_id` (as shown to people)."""
        return [r for r in self.replies if r.job_id == job_id][-1]

    def shown_controls(self, message_id: str) -> tuple[Control, ...]:
        """The controls the message `message_id` shows now (its newest stream's)."""
        return [r for r in self.replies if r.message_id == message_id][-1].controls

    async def press(
        self,
        job_id: int,
        control: Control,
        *,
        chat: str = "chat",
        user: str = "alice",
        admin: bool = False,
        direct: bool = False,
        press_id: str | None = None,
    ):  # noqa: ANN201 - RouteResult
        """Press `control` on the reply of job `job_id` as a user; returns the core's result.
        Each press gets its own platform id unless `press_id` repeats one (a redelivery)."""
        assert self.core is not None, "start the app first"
        press = ControlPress(
            conversation=ConversationKey(self.platform, chat),
            job_id=job_id,
            control=control,
            author=Author(id=user, name=user.capitalize(), is_admin=admin),
            press_id=press_id if press_id is not None else f"press-{next(self._ids)}",
            is_direct=direct,
        )
        return await self.core.press(press)

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

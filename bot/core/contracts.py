"""What adapters and the core agree on: the one place both sides import.

An adapter converts platform events into `IncomingMessage`s and hands them to the `Core`; the core
answers with a `RouteResult` (what happened, as a value) and shows generated replies through a
`ReplyStream` the job queue opens with `Adapter.open_reply`. Nothing here knows a platform.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from bot.core.types import Author, ConversationKey, IncomingMessage

__all__ = [
    "Core",
    "Outcome",
    "RefusalKind",
    "QueueLimit",
    "Refusal",
    "RouteResult",
    "Attachment",
    "KnownConversation",
    "Adapter",
    "ReplyStream",
    "Control",
    "ControlPress",
]


class Outcome(str, enum.Enum):
    """What the core did with one incoming message."""

    IGNORED = "ignored"
    """Not for this bot: another bot's command, an empty message, a bot's own message."""
    RECORDED = "recorded"
    """Kept as context; no answer."""
    COMMAND = "command"
    """A command ran; `RouteResult.reply` is its answer."""
    QUEUED = "queued"
    """Recorded and queued; the answer streams through a ReplyStream."""
    DUPLICATE = "duplicate"
    """Seen before (a redelivered update); nothing new happened."""
    BUSY = "busy"
    """Refused for now (rate or queue limit); `RouteResult.refusal` says which and for how long."""
    REFUSED = "refused"
    """Refused for good (too long, not allowed); `RouteResult.refusal` says why."""
    ERROR = "error"
    """Something failed; the reply says so without internals."""


class RefusalKind(str, enum.Enum):
    NOT_ADMIN = "not_admin"
    TOO_LONG = "too_long"
    RATE_LIMITED = "rate_limited"
    QUEUE_FULL = "queue_full"
    NOT_YOURS = "not_yours"
    """A control on someone else's reply in a shared chat (only its asker or an admin may press it)."""
    CONVERSATION_RESET = "conversation_reset"
    """A control on a reply whose conversation was reset (or forgotten) since."""
    CONTROL_EXPIRED = "control_expired"
    """A control that no longer applies: Stop on a finished reply, a control on an older reply."""


class QueueLimit(str, enum.Enum):
    """Which queue bound was reached (`[queue]` keys)."""

    USER = "max_pending_per_user"
    CONVERSATION = "max_pending_per_conversation"
    TOTAL = "max_pending"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message or command was refused, as data; `bot.conversation.messages` renders it."""

    kind: RefusalKind
    seconds: int | None = None
    """RATE_LIMITED: seconds until the user may send again."""
    limit: QueueLimit | None = None
    """QUEUE_FULL: which bound."""
    count: int = 0
    """TOO_LONG: characters sent; QUEUE_FULL: jobs already waiting."""
    maximum: int = 0
    """TOO_LONG: the character limit; QUEUE_FULL: the bound's value."""
    command: str | None = None
    """NOT_ADMIN and command refusals: the command's name."""


class Control(str, enum.Enum):
    """A control a reply carries: a Discord button, a Telegram inline-keyboard button, a terminal
    command (Ctrl-C, `/retry`, `/continue`)."""

    STOP = "stop"
    """While the reply streams: end it at the next decode step, keeping what was shown."""
    REGENERATE = "regenerate"
    """On a finished (or stopped) reply: answer the same question again, replacing it in place."""
    CONTINUE = "continue"
    """On a reply cut by its token limit: go on from exactly where it stopped, appended to it."""


@dataclass(frozen=True, slots=True)
class ControlPress:
    """Someone pressed a control on the reply of job `job_id` (the id the control carries)."""

    conversation: ConversationKey
    job_id: int
    control: Control
    author: Author
    press_id: str = ""
    """The platform's id of this press (a Discord interaction id, a Telegram callback query id):
    a press delivered twice runs once. Empty where a press cannot come twice (the terminal)."""
    is_direct: bool = False
    """A one-to-one chat: its user may press every control in it."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file a command answers with (`/export`): adapters that can send files deliver it with
    `RouteResult.reply` as its caption; the others show the reply text alone."""

    filename: str
    data: bytes
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class RouteResult:
    """What the core did. `reply`, when set, is a short answer the adapter shows the author
    (a command's answer, a refusal); generated replies come through a ReplyStream."""

    outcome: Outcome
    reply: str | None = None
    job_id: int | None = None
    refusal: Refusal | None = None
    private: bool = False
    """The answer concerns the author only (a refusal, an error, a personal listing): platforms
    that can show it to the author alone (Discord's ephemeral answers) should."""
    attachment: Attachment | None = None
    """A file for the author (private): see `Attachment`."""


@dataclass(frozen=True, slots=True)
class KnownConversation:
    """A conversation the core has stored, as an adapter sees it (to catch up on what it missed)."""

    key: ConversationKey
    is_direct: bool
    last_message_at: datetime | None
    """When the newest message people sent there was sent; None when none was recorded."""


class Core(Protocol):
    """What an adapter may ask of Parley's core (the runtime hands adapters `bot.conversation.Router`
    plus what only storage knows)."""

    async def handle(self, message: IncomingMessage) -> RouteResult: ...

    async def handle_update(self, message: IncomingMessage) -> RouteResult:
        """`handle` for platforms that deliver an update again until it is confirmed (Telegram):
        raises `StorageUnavailable` having recorded nothing, so the adapter leaves the update
        unconfirmed and tries it again later, instead of an answer."""
        ...

    async def claim_update(self, message: IncomingMessage) -> bool:
        """Record that the update carrying `message` was handled, for what an adapter answers by
        itself (a welcome); False when it had been (say nothing then)."""
        ...

    async def handle_edit(self, message: IncomingMessage) -> bool: ...

    async def press(self, press: ControlPress) -> RouteResult:
        """A control pressed on a reply; it goes through the same queue, limits and fairness as a
        message. Outcomes: QUEUED (Regenerate or Continue queued; `job_id` is the new job),
        COMMAND (Stop accepted), DUPLICATE (this press was handled before: do nothing), BUSY (a
        rate or queue limit), REFUSED (`refusal.kind` NOT_YOURS, CONVERSATION_RESET or
        CONTROL_EXPIRED). `reply`, when set, is the sentence for the presser alone (a Telegram
        callback answer, a Discord ephemeral message)."""
        ...

    async def handle_delete(self, conversation: ConversationKey, message_id: str) -> bool: ...

    async def wait_for(self, job_id: int) -> str: ...

    def set_bot_username(self, platform: str, username: str) -> None: ...

    async def conversations_on(self, platform: str) -> Sequence[KnownConversation]:
        """The conversations stored for `platform`: where messages may have been missed while the
        adapter was away (platforms that do not redeliver them, like Discord, read those back)."""
        ...

    async def lease(self, role: str, holder: str, ttl: float) -> bool:
        """Take or renew `role` (a platform account: "telegram:" + a hash of the token, never the
        token) for `holder` for `ttl` seconds, through the database every process shares; False
        while another holds it. The holder must stop acting on the role `ttl` after the start of
        its last successful call. Raises `StorageUnavailable` when the database cannot say."""
        ...

    async def release_lease(self, role: str, holder: str) -> None:
        """Give `role` up at once (a clean stop), so another process takes over without waiting."""
        ...


class ReplyStream(abc.ABC):
    """One generated reply on its way to the platform.

    `update` gets the whole text so far (not a delta) and may be called often: the adapter
    throttles edits to its platform's rate. `finish` shows the final text and returns the
    platform ids of the messages it used; it raises only when the text could not be shown. `fail`
    replaces the reply with an error notice.
    """

    job_id: int | None = None
    """Set by the job queue before the first update: the job whose controls this reply carries
    (platforms put it in the controls' ids, so a press names its reply even after a restart)."""

    controls: tuple[Control, ...] = ()
    """The controls the reply's last message shows from its next render on (`set_controls`)."""

    on_posted: Callable[[list[str]], Awaitable[None]] | None = None
    """Set by the job queue: awaited with `posted_ids` each time a new message is posted, before
    the next is sent, so the ids are persisted and a restart edits those messages, not reposts."""

    on_render: Callable[[str], Awaitable[None]] | None = None
    """Set by the job queue: awaited with the text a streaming render is about to show, before the
    platform is asked to show it, so the text is persisted first and a reply cut by a crash goes
    on from at least what people saw (without it the queue persists the text about once a second,
    and a restart may go on from a little less than was shown)."""

    async def report_posted(self) -> None:
        """For implementations: call after posting a message (and before posting another)."""
        if self.on_posted is not None:
            await self.on_posted(self.posted_ids)

    async def report_render(self, text: str) -> None:
        """For implementations: call with the text (the whole reply so far) before a streaming
        render shows it (`update`'s renders; `finish` and `fail` need not)."""
        if self.on_render is not None:
            await self.on_render(text)

    async def set_controls(self, controls: Sequence[Control]) -> None:
        """Show `controls` on the reply from its next render on (`update`, `finish`); none removes
        them. The queue sets (STOP) before the first update and the finished reply's controls
        before `finish`; `fail` always shows none. Platforms without buttons keep the default."""
        self.controls = tuple(controls)

    @abc.abstractmethod
    async def update(self, text: str) -> None: ...

    @abc.abstractmethod
    async def finish(self, text: str) -> list[str]: ...

    @abc.abstractmethod
    async def fail(self, notice: str) -> None: ...

    @property
    def posted_ids(self) -> list[str]:
        """Platform ids of the messages posted so far (the queue persists them while streaming)."""
        return []


class Adapter(abc.ABC):
    """A platform. Long-lived: `start(core)` then `stop()`; nothing connects at construction."""

    platform: str = ""
    max_message_length: int = 4000
    edit_interval: float = 1.0
    supports_controls: bool = False
    """Replies here show controls (buttons): the queue then removes older replies' controls."""

    @property
    def connected(self) -> bool:
        """Whether the platform is reachable now, for `/readyz` (a standby that does not hold its
        platform's lease counts as connected: it is ready to take over)."""
        return True

    @abc.abstractmethod
    async def start(self, core: Core) -> None:
        """Connect and begin delivering messages to `core.handle`."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect; pending replies are left to the queue (they are persisted)."""

    @abc.abstractmethod
    async def open_reply(
        self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()
    ) -> ReplyStream:
        """Begin a generated reply in `conversation`, answering message `reply_to` when given.
        `resume` lists messages an interrupted attempt already posted: edit them, don't repost."""

    async def clear_controls(self, conversation: ConversationKey, message_ids: Sequence[str]) -> None:
        """Remove the controls of an older reply (its messages `message_ids`), because a newer one
        arrived or its conversation was reset. Best effort: a message already gone is no error."""
        return None

    async def send(self, conversation: ConversationKey, text: str, reply_to: str | None = None) -> list[str]:
        """Send a plain message (a notice); the default goes through a reply stream."""
        stream = await self.open_reply(conversation, reply_to)
        return await stream.finish(text)

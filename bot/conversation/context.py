"""What the conversation layer needs from the layers around it, and what a command handler gets.

`JobsPort` and `HealthPort` are the few calls the router and the commands make on the job queue
and the generation backend; `bot.jobs.GenerationQueue` and every `GenerationClient` satisfy them
structurally, so this package never imports the layers above it. `CommandContext` is all a
command handler sees: the message, its conversation, the defaults, storage, the queue and the
backend's health. Not the router. Admin changes write their audit rows themselves, in the
change's transaction (`storage.conversations`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bot.conversation.history import effective_settings, effective_system_prompt
from bot.core.types import GenerationSettings, IncomingMessage, JobKind

if TYPE_CHECKING:
    from storage import Conversation, Repository

    from bot.generation.client import BackendHealth

__all__ = ["JobsPort", "HealthPort", "ConversationDefaults", "CommandContext"]


class JobsPort(Protocol):
    """The job queue as the conversation layer uses it (`bot.jobs.GenerationQueue`)."""

    async def enqueue(self, conversation_id: int, message: IncomingMessage, text: str) -> tuple[Any, bool]:
        """Record the message and queue a job: (job, created). Raises `QueueFull`."""

    async def reset(self, conversation_id: int, *, system_prompt: str | None) -> tuple[int, int]:
        """Archive the history and cancel pending jobs: (archived, cancelled)."""

    async def forget(self, conversation_id: int, author_id: str) -> tuple[int, int]:
        """Archive one author's messages and the replies to them: (archived, cancelled)."""

    async def enqueue_followup(self, parent_job_id: int, kind: JobKind) -> tuple[Any, bool]:
        """Queue a Regenerate or Continue of a reply: (job, created). Raises `QueueFull`."""

    async def stop_reply(self, job_id: int) -> bool:
        """Stop a queued or streaming reply; False when it had already ended."""

    async def depth(self) -> int:
        """Jobs queued or running, everywhere."""

    async def position_for_author(self, conversation_id: int, author_id: str) -> int | None:
        """Where the author's next reply in this conversation stands in line (1 = next)."""

    async def wait_for(self, job_id: int) -> str:
        """Wait until a job ends; its final status."""


class HealthPort(Protocol):
    """The generation backend as the conversation layer uses it (any `GenerationClient`)."""

    async def health(self) -> BackendHealth: ...


class DescribedCommand(Protocol):
    """What a handler may read of the command it runs (`registry.Command` satisfies it)."""

    @property
    def help_line(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ConversationDefaults:
    """The configured defaults a conversation falls back to (`[bot]` and `[generation]`)."""

    bot_name: str
    system_prompt: str
    generation: GenerationSettings


@dataclass(slots=True)
class CommandContext:
    """What one run of a command may use. The registry checks permissions before the handler runs."""

    message: IncomingMessage
    defaults: ConversationDefaults
    repo: Repository
    jobs: JobsPort
    health: Callable[[], Awaitable[BackendHealth]]
    command: DescribedCommand | None = None
    """The command being run (set by the registry)."""
    _conversation: Conversation | None = field(default=None, repr=False)

    @property
    def may_administer(self) -> bool:
        """DESIGN's rule: in a direct chat the user is the admin of their own conversation; in a
        shared one only the people the adapter marked as admins."""
        return self.message.is_direct or self.message.author.is_admin

    async def conversation(self) -> Conversation:
        """The stored conversation of the message (created on first use, then kept)."""
        if self._conversation is None:
            self._conversation = await self.repo.get_or_create_conversation(
                self.message.conversation, is_direct=self.message.is_direct
            )
        return self._conversation

    def settings_of(self, conversation: Conversation) -> GenerationSettings:
        """The conversation's generation settings over the configured defaults."""
        return effective_settings(conversation, self.defaults.generation)

    def system_prompt_of(self, conversation: Conversation) -> str:
        return effective_system_prompt(conversation, self.defaults.system_prompt)

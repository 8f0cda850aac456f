"""The GPU behind one interface: what the queue asks of a generation backend.

Two implementations share the worker's engine: `SubprocessGenerationClient` (production: the
model lives in a child process, the only one that imports torch) and `InProcessGenerationClient`
(tests: the same engine on a thread of this process). `make_generation_client` picks one.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from bot.core.types import ChatMessage, GenerationSettings

__all__ = [
    "GenerationRequest",
    "TextDelta",
    "GenerationResult",
    "ModelInfo",
    "WorkerHealth",
    "GenerationClient",
]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One job for the worker: the whole chat (system first), untrimmed; the worker trims it to fit."""

    job_id: int
    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text of a job's reply, to append to what came before."""

    text: str


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The last item of a job's stream."""

    finish_reason: str
    """"stop" (end of turn), "length" (max_new_tokens), or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    dropped_messages: int = 0
    """How many of the oldest history messages were left out to fit the context window."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the worker loaded, as told in its READY message."""

    name: str
    quantization: str
    device: str
    dtype: str
    context_window: int
    max_batch: int
    load_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    alive: bool
    model: ModelInfo | None
    running_jobs: int
    restarts: int
    pid: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


class GenerationClient(abc.ABC):
    """A generation backend. Long-lived: `await start()` (or `async with`), then `submit` many jobs."""

    @abc.abstractmethod
    async def start(self) -> ModelInfo:
        """Start the backend and wait for READY. Raises `WorkerStartError` naming the setting to change."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the backend; in-flight jobs end with `WorkerDead`."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        """Stream a job: `TextDelta`s, then exactly one `GenerationResult`.

        Raises `JobFailed` if this job failed, `WorkerDead` if the backend died while holding it
        (the client restarts the backend by itself; the caller decides whether to retry).
        """

    @abc.abstractmethod
    async def cancel(self, job_id: int) -> None:
        """Ask the backend to stop a job; its stream ends with finish_reason "cancelled"."""

    @abc.abstractmethod
    async def health(self) -> WorkerHealth:
        """Whether the backend is alive, what it runs, how often it was restarted."""

    @property
    @abc.abstractmethod
    def model_info(self) -> ModelInfo | None:
        """The model loaded, once started."""

    async def __aenter__(self) -> GenerationClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

"""The GPU behind one interface: what the queue asks of a generation backend.

Three implementations: `SubprocessGenerationClient` (production: the model lives in a child
process, the only one that imports torch), `InProcessGenerationClient` (tests: the same engine on
a thread of this process) and `OpenAIGenerationClient` (an OpenAI-compatible serving engine).
`bot.runtime.backends.make_generation_client` picks one.
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
    "BackendHealth",
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
    cached_tokens: int = 0
    """How many of the prompt tokens came from the worker's prefix cache instead of being prefilled."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the backend serves: for the worker, what it loaded, as told in its READY message."""

    name: str
    quantization: str
    device: str
    dtype: str
    context_window: int
    max_batch: int
    load_seconds: float = 0.0
    served_by: str = ""
    """For a model on a serving engine: the server's address. Quantization, dtype and device are
    then the server's business, unknown here, and left empty; "" for a model Parley runs itself."""

    def how(self) -> str:
        """How the model runs, for people: "4bit, bfloat16, on cuda" or "served by http://…"."""
        return f"served by {self.served_by}" if self.served_by else f"{self.quantization}, {self.dtype}, on {self.device}"


@dataclass(frozen=True, slots=True)
class BackendHealth:
    """A generation backend's health, as `/status` and the benchmarks read it."""

    alive: bool
    """Whether the backend takes jobs now (a worker process is up, a model server answered)."""
    model: ModelInfo | None
    """The model it serves, once started."""
    running_jobs: int
    """Jobs this client has handed to the backend and not yet seen end."""
    restarts: int = 0
    """How often the client had to restart its backend (one that it cannot restart reports 0)."""
    pid: int | None = None
    """The process id of a worker process while one runs; None for a backend without a local process."""
    extra: dict[str, object] = field(default_factory=dict)
    """Backend-specific details for logs and benchmarks (a worker's state and last exit, a
    server's base URL and last error, batch counters...)."""


class GenerationClient(abc.ABC):
    """A generation backend. Long-lived: `await start()` (or `async with`), then `submit` many jobs."""

    @abc.abstractmethod
    async def start(self) -> ModelInfo:
        """Start the backend and wait until it is ready. Raises `BackendStartError` naming the setting to change."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the backend; in-flight jobs end with `BackendDown`."""

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        """Stream a job: `TextDelta`s, then exactly one `GenerationResult`.

        Raises `JobFailed` if this job failed, `BackendDown` if the backend went away while holding
        it (a worker-process client restarts its worker by itself; the caller decides whether to
        retry).
        """

    @abc.abstractmethod
    async def cancel(self, job_id: int) -> None:
        """Ask the backend to stop a job; its stream ends with finish_reason "cancelled"."""

    @abc.abstractmethod
    async def health(self) -> BackendHealth:
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

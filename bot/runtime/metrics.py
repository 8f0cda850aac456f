"""Prometheus metrics, observed through seams of the runtime (nothing below it knows of them).

`ParleyMetrics` owns one `CollectorRegistry` per app (never the global one: several apps in a
process, and tests, each have their own) and fills it from three places:

- `MeteredGenerationClient` wraps the client the queue talks to: time to first token, reply
  latency, generated tokens and tokens per second from each job's stream; the time the job waited
  (submit time minus `Job.created_at`, on its first attempt); jobs run after a backend went down
  (attempts > 0: the scheduler runs those alone).
- `count_route` sees every `RouteResult` adapters get (`AdapterCore`): messages by platform and
  outcome, refusals by reason.
- `refresh()`, awaited at each scrape, reads what is kept elsewhere: queue depth
  (`Repository.pending_count`), jobs by outcome (`GenerationQueue.stats`), the backend's health
  (alive, worker restarts, and the prefix cache and model memory where `BackendHealth.extra` has
  them).

Labels are bounded: platform, outcome, reason; never a user or a conversation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.core.contracts import Outcome, RouteResult
from bot.core.errors import StorageError
from bot.core.types import IncomingMessage
from bot.generation.client import (
    BackendHealth,
    GenerationClient,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    TextDelta,
)

from storage.models import utcnow

if TYPE_CHECKING:
    from storage import Repository

    from bot.jobs.queue import GenerationQueue

__all__ = ["ParleyMetrics", "MeteredGenerationClient", "MeteredJobs", "HEALTH_EXTRA_METRICS"]

log = logging.getLogger("parley.metrics")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0)
_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)

HEALTH_EXTRA_METRICS: dict[str, tuple[str, str, str]] = {
    # BackendHealth.extra key → (metric name, kind, help); exposed only when the backend reports it.
    "prefix_cache_hits": ("parley_prefix_cache_hits", "counter", "Prompts that reused a cached prefix"),
    "prefix_cache_evictions": ("parley_prefix_cache_evictions", "counter", "Prefix-cache entries evicted"),
    "gpu_memory_bytes": ("parley_model_memory_bytes", "gauge", "Memory the model uses (GPU memory on CUDA)"),
    "model_memory_bytes": ("parley_model_memory_bytes", "gauge", "Memory the model uses (GPU memory on CUDA)"),
}


@dataclass
class _Snapshot:
    """What `refresh()` last read, for the synchronous collector."""

    queue_depth: int | None = None
    jobs: dict[str, int] = field(default_factory=dict)
    health: BackendHealth | None = None


class _ScrapeCollector(Collector):
    def __init__(self, metrics: ParleyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        snapshot = self.metrics.snapshot
        if snapshot.queue_depth is not None:
            yield GaugeMetricFamily("parley_queue_depth", "Jobs queued or running (the whole database)", value=snapshot.queue_depth)
        jobs = CounterMetricFamily("parley_jobs", "Jobs that ended, by outcome", labels=["outcome"])
        for outcome in ("done", "failed", "stopped", "cancelled"):
            jobs.add_metric([outcome], snapshot.jobs.get(outcome, 0))
        yield jobs
        health = snapshot.health
        if health is None:
            return
        yield GaugeMetricFamily("parley_backend_up", "1 while the generation backend takes jobs", value=1 if health.alive else 0)
        yield GaugeMetricFamily("parley_backend_running_jobs", "Jobs the backend holds now", value=health.running_jobs)
        yield CounterMetricFamily("parley_worker_restarts", "Times the worker process was restarted", value=health.restarts)
        seen: set[str] = set()
        for key, (name, kind, help_text) in HEALTH_EXTRA_METRICS.items():
            value = health.extra.get(key)
            if name in seen or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            seen.add(name)
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=value)


class ParleyMetrics:
    """One app's metrics. `watch(...)` once the parts run; `exposition()` for each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        self.time_to_first_token = Histogram(
            "parley_time_to_first_token_seconds", "From submitting a job to its first text", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.reply_seconds = Histogram(
            "parley_reply_seconds", "From submitting a job to its last token", buckets=_LATENCY_BUCKETS, registry=registry
        )
        self.generated_tokens = Counter("parley_generated_tokens", "Tokens generated", registry=registry)
        self.tokens_per_second = Histogram(
            "parley_tokens_per_second", "Generation speed of each reply", buckets=_RATE_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "parley_queue_wait_seconds", "From a job's creation to its first submit", buckets=_WAIT_BUCKETS, registry=registry
        )
        self.isolated_jobs = Counter(
            "parley_isolated_jobs", "Jobs run alone because a backend went down while holding them", registry=registry
        )
        self.messages = Counter(
            "parley_messages", "Messages adapters handed to the core, by platform and outcome", ["platform", "outcome"], registry=registry
        )
        self.refusals = Counter(
            "parley_refusals", "Messages and commands refused, by platform and reason", ["platform", "reason"], registry=registry
        )
        self.cancelled_waiting = 0
        """Jobs cancelled before they ran (/reset, /forget), counted by `MeteredJobs`."""
        self.snapshot = _Snapshot()
        self._repo: Repository | None = None
        self._queue: GenerationQueue | None = None
        self._health: Callable[[], Awaitable[BackendHealth]] | None = None
        registry.register(_ScrapeCollector(self))

    def watch(
        self, *, repo: Repository, queue: GenerationQueue, health: Callable[[], Awaitable[BackendHealth]]
    ) -> None:
        self._repo, self._queue, self._health = repo, queue, health

    def count_route(self, platform: str, result: RouteResult) -> None:
        self.messages.labels(platform, result.outcome.value).inc()
        if result.refusal is not None and result.outcome in (Outcome.BUSY, Outcome.REFUSED, Outcome.COMMAND):
            self.refusals.labels(platform, result.refusal.kind.value).inc()

    def counted(
        self, handle: Callable[[IncomingMessage], Awaitable[RouteResult]]
    ) -> Callable[[IncomingMessage], Awaitable[RouteResult]]:
        """`handle` (or `handle_update`) that counts what it returns."""

        async def counting(message: IncomingMessage) -> RouteResult:
            result = await handle(message)
            self.count_route(message.conversation.platform, result)
            return result

        return counting

    async def refresh(self) -> None:
        """Read what lives elsewhere (queue depth, jobs by outcome, backend health)."""
        snapshot = _Snapshot()
        if self._queue is not None:
            stats = self._queue.stats
            snapshot.jobs = {
                "done": stats.get("done", 0),
                "failed": stats.get("failed", 0),
                # A job that ends cancelled in the queue was running: someone stopped it.
                "stopped": stats.get("cancelled", 0),
                "cancelled": self.cancelled_waiting,
            }
        if self._repo is not None:
            try:
                snapshot.queue_depth = await self._repo.pending_count()
            except StorageError as exc:
                log.debug("metrics: queue depth unavailable: %s", exc)
        if self._health is not None:
            snapshot.health = await self._health()
        self.snapshot = snapshot

    async def exposition(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)


class MeteredJobs:
    """The queue as the router sees it, counting the jobs /reset and /forget cancel before they ran."""

    def __init__(self, queue: GenerationQueue, metrics: ParleyMetrics) -> None:
        self._queue = queue
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    async def reset(self, conversation_id: int, *, system_prompt: str | None) -> tuple[int, int]:
        archived, cancelled = await self._queue.reset(conversation_id, system_prompt=system_prompt)
        self._metrics.cancelled_waiting += cancelled
        return archived, cancelled

    async def forget(self, conversation_id: int, author_id: str) -> tuple[int, int]:
        archived, cancelled = await self._queue.forget(conversation_id, author_id)
        self._metrics.cancelled_waiting += cancelled
        return archived, cancelled


class MeteredGenerationClient(GenerationClient):
    """A `GenerationClient` that times each job's stream; everything else is the inner client's."""

    def __init__(self, inner: GenerationClient, metrics: ParleyMetrics, repo: Repository | None = None) -> None:
        self.inner = inner
        self.metrics = metrics
        self.repo = repo

    async def start(self) -> ModelInfo:
        return await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def cancel(self, job_id: int) -> None:
        await self.inner.cancel(job_id)

    async def health(self) -> BackendHealth:
        return await self.inner.health()

    @property
    def model_info(self) -> ModelInfo | None:
        return self.inner.model_info

    def submit(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        return self._metered(request)

    async def _metered(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        metrics = self.metrics
        started = time.monotonic()
        await self._observe_job(request.job_id)
        first: float | None = None
        stream = self.inner.submit(request)
        try:
            async for event in stream:
                if isinstance(event, TextDelta):
                    if first is None and event.text:
                        first = time.monotonic()
                        metrics.time_to_first_token.observe(first - started)
                elif isinstance(event, GenerationResult):
                    ended = time.monotonic()
                    metrics.reply_seconds.observe(ended - started)
                    metrics.generated_tokens.inc(event.completion_tokens)
                    generating = ended - (first if first is not None else started)
                    if event.completion_tokens and generating > 0:
                        metrics.tokens_per_second.observe(event.completion_tokens / generating)
                yield event
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def _observe_job(self, job_id: int) -> None:
        if self.repo is None:
            return
        try:
            job = await self.repo.get_job(job_id)
        except StorageError:
            return
        if job is None:
            return
        if job.attempts:
            self.metrics.isolated_jobs.inc()
        else:
            self.metrics.queue_wait.observe(max(0.0, (utcnow() - job.created_at).total_seconds()))

"""The app: wires storage, the generation backend, the queue, the router and the adapters, and
runs them under one lifecycle on a `contextlib.AsyncExitStack` (start in order, stop in reverse,
and a failed start stops what had started)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from bot.conversation.router import Router
from bot.core.config import Settings
from bot.core.contracts import Adapter, KnownConversation
from bot.generation.client import GenerationClient
from bot.jobs.attempt import AttemptPolicy
from bot.jobs.queue import GenerationQueue
from bot.runtime.backends import make_generation_client
from bot.runtime.health import Readiness, StatusServer
from bot.runtime.metrics import MeteredGenerationClient, MeteredJobs, ParleyMetrics
from storage import Database, Repository, default_owner
from storage.retention import RetentionSweeper

__all__ = ["ParleyApp", "AdapterCore"]

log = logging.getLogger("parley.app")


class AdapterCore:
    """The `Core` adapters are given: the router for everything it answers, and what only storage
    knows (the conversations an adapter may have missed messages in)."""

    def __init__(self, router: Router, repo: Repository, metrics: ParleyMetrics | None = None) -> None:
        self.router = router
        self.repo = repo
        self.handle = router.handle
        self.handle_update = router.handle_update
        if metrics is not None:  # every RouteResult counted by platform, outcome, refusal reason
            self.handle = metrics.counted(router.handle)
            self.handle_update = metrics.counted(router.handle_update)
        self.press = router.press
        if metrics is not None:
            self.press = metrics.counted(router.press)
        self.claim_update = router.claim_update
        self.handle_edit = router.handle_edit
        self.handle_delete = router.handle_delete
        self.wait_for = router.wait_for
        self.set_bot_username = router.set_bot_username

    async def conversations_on(self, platform: str) -> list[KnownConversation]:
        return await self.repo.conversations_on(platform)

    async def lease(self, role: str, holder: str, ttl: float) -> bool:
        return await self.repo.lease(role, holder, ttl)

    async def release_lease(self, role: str, holder: str) -> None:
        await self.repo.release_lease(role, holder)


class ParleyApp:
    """`async with ParleyApp(settings, adapters) as app:` runs Parley until the block ends.

    After start: `database`, `repo`, `client`, `queue`, `router` are the running parts.
    """

    def __init__(
        self,
        settings: Settings,
        adapters: Sequence[Adapter],
        *,
        client: GenerationClient | None = None,
    ) -> None:
        self.settings = settings
        self.adapters = {adapter.platform: adapter for adapter in adapters}
        self.database = Database(settings.database_url())
        self.client = client or make_generation_client(settings)
        self.repo: Repository | None = None
        self.queue: GenerationQueue | None = None
        self.router: Router | None = None
        self.metrics = ParleyMetrics() if settings.metrics.enabled else None
        """The app's own metrics registry ([metrics] enabled), served by `status_server`."""
        self.status_server: StatusServer | None = None
        self.retention: RetentionSweeper | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._start_part(stack, self.database)
            self.repo = Repository(self.database.sessions, owner=default_owner(self.settings.bot.instance_name))
            if self.metrics is not None:
                readiness = Readiness(database=self.repo.pending_count, backend=self.client.health, adapters=self.adapters)
                metrics_settings = self.settings.metrics
                self.status_server = StatusServer(
                    self.metrics, readiness, host=metrics_settings.host, port=metrics_settings.port
                )
                await self._start_part(stack, self.status_server)
            info = await self._start_part(stack, self.client)
            log.info(
                "model ready: %s (%s) in %.1f s", info.name, info.how(), info.load_seconds
            )
            settings = self.settings
            policy = AttemptPolicy(
                default_system_prompt=settings.bot.system_prompt,
                default_settings=settings.generation,
                bot_name=settings.bot.name,
                max_attempts=settings.worker.max_attempts,
            )
            generation = self.client
            if self.metrics is not None:
                generation = MeteredGenerationClient(self.client, self.metrics, self.repo)
            self.queue = GenerationQueue(
                self.repo, generation, self.adapters, limits=settings.queue, policy=policy, max_batch=settings.worker.max_batch
            )
            await self._start_part(stack, self.queue)
            jobs = self.queue
            if self.metrics is not None:
                self.metrics.watch(repo=self.repo, queue=self.queue, health=self.client.health)
                jobs = MeteredJobs(self.queue, self.metrics)
            if settings.storage.keep_days:
                self.retention = RetentionSweeper(self.repo, keep_days=settings.storage.keep_days)
                await self._start_part(stack, self.retention)
            self.router = Router(
                self.repo, jobs, self.client,
                bot=settings.bot, queue_limits=settings.queue, generation=settings.generation,
            )
            core = AdapterCore(self.router, self.repo, self.metrics)
            for adapter in self.adapters.values():
                await adapter.start(core)
                stack.push_async_callback(self._stop_part, adapter)
            self._stack = stack.pop_all()  # started: stop() unwinds it

    async def _start_part(self, stack: contextlib.AsyncExitStack, part):  # noqa: ANN001, ANN202
        result = await part.start()
        stack.push_async_callback(self._stop_part, part)
        return result

    @staticmethod
    async def _stop_part(part: object) -> None:
        try:
            await part.stop()  # type: ignore[attr-defined]
        except Exception:
            log.exception("error while stopping %s", type(part).__name__)

    async def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> ParleyApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

"""The app: wires storage, the generation backend, the queue, the router and the adapters, and
runs them under one lifecycle on a `contextlib.AsyncExitStack` (start in order, stop in reverse,
and a failed start stops what had started)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from bot.conversation.router import Router
from bot.core.config import Settings
from bot.core.contracts import Adapter
from bot.generation.client import GenerationClient
from bot.jobs.attempt import AttemptPolicy
from bot.jobs.queue import GenerationQueue
from bot.runtime.backends import make_generation_client
from storage import Database, Repository

__all__ = ["ParleyApp"]

log = logging.getLogger("parley.app")


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
        self._stack: contextlib.AsyncExitStack | None = None

    async def start(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            await self._start_part(stack, self.database)
            self.repo = Repository(self.database.sessions)
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
            self.queue = GenerationQueue(
                self.repo, self.client, self.adapters, limits=settings.queue, policy=policy, max_batch=settings.worker.max_batch
            )
            await self._start_part(stack, self.queue)
            self.router = Router(
                self.repo, self.queue, self.client,
                bot=settings.bot, queue_limits=settings.queue, generation=settings.generation,
            )
            for adapter in self.adapters.values():
                await adapter.start(self.router)
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

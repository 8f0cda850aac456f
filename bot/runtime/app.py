"""The app: wires storage, the generation client, the queue, the router and the adapters, and
runs them under one lifecycle (start in order, stop in reverse)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.core.config import Settings
from bot.generation.client import GenerationClient
from bot.runtime.backends import make_generation_client
from bot.jobs.queue import GenerationQueue
from bot.conversation.router import Router

if TYPE_CHECKING:
    from bot.core.contracts import Adapter

__all__ = ["ParleyApp"]

log = logging.getLogger("parley.app")


class ParleyApp:
    """`async with ParleyApp(settings, adapters) as app:` runs Parley until the block ends."""

    def __init__(
        self,
        settings: Settings,
        adapters: Sequence[Adapter],
        *,
        client: GenerationClient | None = None,
    ) -> None:
        from storage import Database, Repository

        self.settings = settings
        self.adapters = {adapter.platform: adapter for adapter in adapters}
        self.database = Database(settings.database_url())
        self.repo: Repository | None = None
        self._repository_class = Repository
        self.client = client or make_generation_client(settings)
        self.queue: GenerationQueue | None = None
        self.router: Router | None = None
        self._started: list[object] = []

    async def start(self) -> None:
        try:
            await self.database.start()
            self._started.append(self.database)
            self.repo = self._repository_class(self.database.sessions)
            info = await self.client.start()
            self._started.append(self.client)
            log.info(
                "model ready: %s (%s, %s, %s) in %.1f s", info.name, info.quantization, info.dtype, info.device, info.load_seconds
            )
            self.queue = GenerationQueue(self.settings, self.repo, self.client, self.adapters)
            await self.queue.start()
            self._started.append(self.queue)
            self.router = Router(self.settings, self.repo, self.queue, self.client)
            for adapter in self.adapters.values():
                await adapter.start(self.router)
                self._started.append(adapter)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        while self._started:
            part = self._started.pop()
            try:
                await part.stop()  # type: ignore[attr-defined]
            except Exception:
                log.exception("error while stopping %s", type(part).__name__)

    async def __aenter__(self) -> ParleyApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

"""The status server: `/metrics` (Prometheus), `/healthz` and `/readyz` on one aiohttp port.

`/healthz` answers 200 while the process runs. `/readyz` answers 200 when the database answers,
the model backend takes jobs and every enabled platform is connected (a standby that does not
hold its platform's lease counts as ready), else 503; both say why in a short JSON body.
Started and stopped with the app (`[metrics] enabled`); each bot process serves its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bot.core.contracts import Adapter
from bot.core.errors import ConfigError, StorageError
from bot.generation.client import BackendHealth
from bot.runtime.metrics import ParleyMetrics

__all__ = ["StatusServer", "Readiness"]

log = logging.getLogger("parley.health")

CHECK_TIMEOUT = 5.0
"""Seconds a readiness check may take before it counts as failed."""


class Readiness:
    """What `/readyz` checks: the database, the backend, each adapter."""

    def __init__(
        self,
        *,
        database: Callable[[], Awaitable[object]],
        backend: Callable[[], Awaitable[BackendHealth]],
        adapters: Mapping[str, Adapter],
    ) -> None:
        self.database = database
        self.backend = backend
        self.adapters = adapters

    async def check(self) -> dict[str, str]:
        """Each part's state: "ok", or why not."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.database(), CHECK_TIMEOUT)
            checks["database"] = "ok"
        except (StorageError, asyncio.TimeoutError) as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            health = await asyncio.wait_for(self.backend(), CHECK_TIMEOUT)
            state = health.extra.get("state")
            checks["backend"] = "ok" if health.alive else f"not ready ({state or 'down'})"
        except asyncio.TimeoutError:
            checks["backend"] = "not answering"
        for platform, adapter in self.adapters.items():
            checks[platform] = "ok" if adapter.connected else "not connected"
        return checks


class StatusServer:
    """`start()` binds `host:port` (0: any free port; `port` says which), `stop()` closes it."""

    def __init__(self, metrics: ParleyMetrics, readiness: Readiness, *, host: str, port: int) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"[metrics] could not listen on {self.host}:{self.port} ({exc}); change [metrics] host or port"
            ) from None
        self._runner = runner
        address = runner.addresses[0]
        self.port = address[1]
        log.info("metrics and probes on http://%s:%d (/metrics, /healthz, /readyz)", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self.readiness.check()
        failing = {name: state for name, state in checks.items() if state != "ok"}
        if failing:
            reason = "; ".join(f"{name}: {state}" for name, state in failing.items())
            return web.json_response({"status": "not ready", "reason": reason, "checks": checks}, status=503)
        return web.json_response({"status": "ready", "checks": checks})

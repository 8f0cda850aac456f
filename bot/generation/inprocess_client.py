"""The in-process generation client: the worker's engine on a thread of this process (for tests).

Same jobs, same stream semantics as `SubprocessGenerationClient`, without a second process:
the engine thread hands each protocol message to the event loop with `call_soon_threadsafe`,
where the shared `JobStreams` routes it. There is nothing to restart: if the engine thread dies,
every running job ends with `WorkerDead` and the client stays down.

This module does not import the worker (nor torch): whoever builds the client passes in how to
load the engine (`bot.runtime.backends` does, with `bot.worker`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from bot.core.errors import BackendStartError, WorkerDead, WorkerStartError
from bot.core.types import ChatMessage, GenerationSettings
from bot.generation import protocol
from bot.generation.client import BackendHealth, ModelInfo
from bot.generation.worker_client import Send, WorkerClientBase

__all__ = ["Emit", "InProcessEngine", "EngineLoader", "InProcessGenerationClient"]

log = logging.getLogger("parley.generation")

Emit = Callable[[protocol.FromWorker], None]
"""How the engine hands each of its protocol messages to the client."""


class InProcessEngine(Protocol):
    """What this client needs of an engine (the worker's `Engine` is one): it takes jobs from any
    thread, and `run` decodes them on the calling thread until `stop`, saying everything through
    the `emit` it was built with."""

    def submit(self, job_id: int, messages: Sequence[ChatMessage], settings: GenerationSettings) -> None: ...

    def cancel(self, job_id: int) -> None: ...

    def run(self) -> None: ...

    def stop(self) -> None: ...


EngineLoader = Callable[[Emit], tuple[InProcessEngine, ModelInfo]]
"""Loads the model and builds an engine that sends its messages to `emit`; returns it with what
was loaded. Blocking (the client runs it on a thread); raises `BackendStartError` naming the
setting to change when the model cannot be loaded."""


class InProcessGenerationClient(WorkerClientBase):
    """Loads the model into this process and decodes on a background thread.

    `start()` loads the model on a thread (it cannot be interrupted, so `[worker] ready_timeout`
    does not apply); `stop()` lets the current decode step finish and joins the thread.
    """

    def __init__(self, load_engine: EngineLoader) -> None:
        super().__init__()
        self._load_engine = load_engine
        self._engine: InProcessEngine | None = None
        self._thread: threading.Thread | None = None
        self._model_info: ModelInfo | None = None
        self._stopped = False

    @property
    def model_info(self) -> ModelInfo | None:
        return self._model_info

    async def start(self) -> ModelInfo:
        if self._model_info is not None:
            return self._model_info
        if self._stopped:
            raise WorkerStartError("this generation client was stopped; make a new one")

        loop = asyncio.get_running_loop()

        def emit(message: protocol.FromWorker) -> None:
            try:
                loop.call_soon_threadsafe(self._streams.route, message, self)
            except RuntimeError:
                pass  # the event loop is closed: nobody is listening any more

        try:
            engine, info = await asyncio.to_thread(self._load_engine, emit)
        except BackendStartError:
            raise
        except Exception as exc:
            raise WorkerStartError(f"loading the model failed ({type(exc).__name__}: {exc}); check [model] model") from exc

        self._engine = engine
        self._thread = threading.Thread(target=self._run_engine, args=(loop,), name="parley-engine", daemon=True)
        self._thread.start()
        self._model_info = info
        return info

    def _run_engine(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._engine is not None
        try:
            self._engine.run()
        except BaseException:
            log.exception("the in-process engine crashed")
            try:
                loop.call_soon_threadsafe(self._streams.fail, lambda: WorkerDead("the in-process engine crashed"))
            except RuntimeError:
                pass
            raise

    def _send(self, message: protocol.ToWorker) -> None:
        engine = self._engine
        if engine is None:
            return
        if isinstance(message, protocol.Submit):
            engine.submit(message.job_id, message.messages, message.settings)
        elif isinstance(message, protocol.Cancel):
            engine.cancel(message.job_id)

    async def _acquire(self) -> tuple[Send, object]:
        if self._stopped or self._thread is None or not self._thread.is_alive():
            raise WorkerDead("the in-process engine is not running")
        return self._send, self

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._engine is not None:
            self._engine.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._streams.fail(lambda: WorkerDead("the generation client was stopped"))

    async def health(self) -> BackendHealth:
        alive = not self._stopped and self._thread is not None and self._thread.is_alive()
        extra: dict[str, object] = {"state": "ready" if alive else ("stopped" if self._stopped else "new")}
        extra.update(self._stream_stats())
        return BackendHealth(
            alive=alive,
            model=self._model_info,
            running_jobs=len(self._streams),
            restarts=0,
            pid=None,
            extra=extra,
        )

"""The production generation client: the model lives in a child process (`python -m bot.worker`).

The client spawns the worker, sends it `configure`, and waits for `ready` (bounded by
`[worker] ready_timeout`). A reader task routes the worker's messages to one asyncio queue per
job. If the worker dies, every job it held ends with `WorkerDead` and a new worker is started
(with backoff when it keeps dying); a `submit` made meanwhile waits for the new READY.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from bot.core.config import Settings
from bot.core.errors import WorkerDead, WorkerStartError
from bot.generation import protocol
from bot.generation.client import BackendHealth, ModelInfo
from bot.generation.worker_client import Send, WorkerClientBase, describe_exit

__all__ = ["SubprocessGenerationClient"]

log = logging.getLogger("parley.generation")
worker_log = logging.getLogger("parley.worker")

# A protocol line carries a whole chat in a submit but only deltas coming back; 16 MiB is roomy.
_LINE_LIMIT = 16 * 1024 * 1024
_STDERR_TAIL_LINES = 30
_LOG_LINE = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)", re.DOTALL)
# Restarts within this many seconds count as "keeps dying" for the backoff.
_FAILURE_WINDOW_S = 300.0


class _Worker:
    """One worker process and what the client knows about it."""

    def __init__(self, process: asyncio.subprocess.Process, number: int) -> None:
        self.process = process
        self.number = number
        self.ready: asyncio.Future[ModelInfo] = asyncio.get_running_loop().create_future()
        self.fatal: str | None = None
        self.serving = False  # READY arrived and the client handed it jobs
        self.last_progress = ""
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.reader: asyncio.Task[None] | None = None
        self.stderr_reader: asyncio.Task[None] | None = None
        self.last_activity = asyncio.get_running_loop().time()  # last line read or message sent

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def send(self, message: protocol.ToWorker) -> None:
        stdin = self.process.stdin
        if not self.running or stdin is None or stdin.is_closing():
            return  # a dead worker: the reader task ends its jobs with WorkerDead
        self.last_activity = asyncio.get_running_loop().time()
        try:
            stdin.write(protocol.encode(message))
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass  # it just died; same as above

    def tail(self) -> str:
        if not self.stderr_tail:
            return ""
        return "\nlast lines the worker wrote on stderr:\n  " + "\n  ".join(self.stderr_tail)


class SubprocessGenerationClient(WorkerClientBase):
    """Runs the model in a `python -m bot.worker` child process and restarts it when it dies.

    Usage::

        client = SubprocessGenerationClient(settings)
        info = await client.start()      # READY, or WorkerStartError naming the setting to change
        async for item in client.submit(GenerationRequest(job_id, messages, settings.generation)):
            ...                          # TextDelta ..., then exactly one GenerationResult
        await client.stop()

    `command` replaces the worker's command line (a wrapper such as `nice`, or a fake worker).
    `ignore_eos` is for benchmarks only (bench/throughput.py): every worker it starts runs each reply
    to max_new_tokens, ignoring end-of-turn tokens, so every reply has the same length.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        command: Sequence[str] | None = None,
        stop_timeout: float = 10.0,
        ignore_eos: bool = False,
    ) -> None:
        super().__init__()
        self._settings = settings
        self._command = list(command) if command else [sys.executable, "-m", "bot.worker"]
        self._stop_timeout = stop_timeout
        self._ignore_eos = ignore_eos
        self._worker: _Worker | None = None
        self._available: asyncio.Future[_Worker] | None = None
        self._model_info: ModelInfo | None = None
        self._state = "new"  # new → starting → ready ⇄ restarting; stopped
        self._spawned = 0
        self._restarts = 0
        self._failures: deque[float] = deque()
        self._restart_task: asyncio.Task[None] | None = None
        self._last_exit: str | None = None
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._nonces = itertools.count(1)

    # -- GenerationClient --

    @property
    def model_info(self) -> ModelInfo | None:
        return self._model_info

    async def start(self) -> ModelInfo:
        if self._state in ("ready", "restarting") and self._model_info is not None:
            return self._model_info
        if self._state == "stopped":
            raise WorkerStartError("this generation client was stopped; make a new one")
        if self._state == "starting":
            raise WorkerStartError("the generation client is already starting")
        self._state = "starting"
        self._available = asyncio.get_running_loop().create_future()
        try:
            worker = await self._launch()
        except BaseException:
            if self._state == "starting":  # (not if stop() came meanwhile)
                self._state = "new"
                self._available = None
            raise
        self._state = "ready"
        self._available.set_result(worker)
        assert self._model_info is not None
        return self._model_info

    async def stop(self) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._restart_task is not None:
            self._restart_task.cancel()
            await asyncio.gather(self._restart_task, return_exceptions=True)
        self._settle_available(WorkerDead("the generation client was stopped"))
        worker = self._worker
        if worker is not None:
            if worker.running:
                worker.send(protocol.Shutdown())
                if worker.process.stdin is not None:
                    worker.process.stdin.close()
                try:
                    await asyncio.wait_for(worker.process.wait(), self._stop_timeout)
                except TimeoutError:
                    log.warning("the worker (pid %d) ignored the shutdown request; terminating it", worker.pid)
                    await self._terminate(worker)
            await self._join(worker)
        self._streams.fail(lambda: WorkerDead("the generation client was stopped"))

    async def health(self) -> BackendHealth:
        worker = self._worker
        alive = self._state == "ready" and worker is not None and worker.running
        return BackendHealth(
            alive=alive,
            model=self._model_info,
            running_jobs=len(self._streams),
            restarts=self._restarts,
            pid=worker.pid if worker is not None and worker.running else None,
            extra={
                "state": self._state,
                "last_exit": self._last_exit,
                "last_progress": worker.last_progress if worker is not None else "",
                **self._stream_stats(),
            },
        )

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a ping to the worker, in seconds (it does not wait for the model)."""
        send, _ = await self._acquire()
        loop = asyncio.get_running_loop()
        nonce = next(self._nonces)
        answered = self._pings[nonce] = loop.create_future()
        began = loop.time()
        try:
            send(protocol.Ping(nonce))
            await asyncio.wait_for(answered, timeout)
        finally:
            self._pings.pop(nonce, None)
        return loop.time() - began

    async def _acquire(self) -> tuple[Send, object]:
        while True:
            if self._available is None or self._state in ("new", "stopped"):
                raise WorkerDead("the generation client is not running (call start() first)")
            # shield: a caller giving up must not cancel the future every other caller waits on.
            worker = await asyncio.shield(self._available)
            if worker is self._worker and worker.serving and worker.running:
                return worker.send, worker
            # It died after READY and its death is being handled: wait for the replacement.
            await asyncio.sleep(0.01)

    # -- the worker's life --

    def _worker_environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # `-m bot.worker` must find this very package even when the bot was started elsewhere.
        root = str(Path(__file__).resolve().parents[2])  # the folder that holds the `bot` package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def _launch(self) -> _Worker:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._worker_environment(),
                limit=_LINE_LIMIT,
            )
        except OSError as exc:
            raise WorkerStartError(f"could not start the worker process {self._command[0]!r}: {exc}") from exc
        self._spawned += 1
        worker = _Worker(process, self._spawned)
        self._worker = worker
        log.info("started the worker process (pid %d); loading %s", worker.pid, self._settings.model.model)
        worker.stderr_reader = asyncio.create_task(self._forward_stderr(worker), name=f"worker-{worker.pid}-stderr")
        worker.reader = asyncio.create_task(self._read_messages(worker), name=f"worker-{worker.pid}-reader")
        worker.send(protocol.Configure(self._settings.model, self._settings.worker, ignore_eos=self._ignore_eos))
        timeout = self._settings.worker.ready_timeout
        try:
            info = await asyncio.wait_for(asyncio.shield(worker.ready), timeout)
        except TimeoutError:
            worker.ready.cancel()  # nobody will read the error of a worker we gave up on
            await self._terminate(worker, grace=0.0)
            await self._join(worker)
            stage = f" (it was at: {worker.last_progress})" if worker.last_progress else ""
            raise WorkerStartError(
                f"the worker did not become ready within [worker] ready_timeout = {timeout:g} s{stage}; "
                "raise [worker] ready_timeout if loading the model takes longer on this machine" + worker.tail()
            ) from None
        except WorkerStartError:
            await self._join(worker)
            raise
        except asyncio.CancelledError:
            worker.ready.cancel()
            await self._terminate(worker, grace=0.0)
            await self._join(worker)
            raise
        if not worker.running:
            await self._join(worker)
            raise WorkerStartError(f"the worker exited ({describe_exit(worker.process.returncode)}) right after READY" + worker.tail())
        worker.serving = True
        self._model_info = info
        log.info(
            "the worker (pid %d) is ready: %s, %s, %s on %s, context window %d, batches of up to %d",
            worker.pid, info.name, info.quantization, info.dtype, info.device, info.context_window, info.max_batch,
        )
        return worker

    async def _read_messages(self, worker: _Worker) -> None:
        stdout = worker.process.stdout
        assert stdout is not None
        stall = self._settings.worker.stall_timeout
        loop = asyncio.get_running_loop()
        while True:
            try:
                # While it holds jobs the worker writes every decode step; silence past the
                # deadline means it hangs (a stuck kernel, a deadlock), so it is replaced.
                line = await asyncio.wait_for(stdout.readline(), min(stall, 5.0))
            except asyncio.TimeoutError:
                silent = loop.time() - worker.last_activity
                if not (worker.serving and len(self._streams) and silent >= stall):
                    continue
                log.error(
                    "the worker (pid %d) sent nothing for %.0f s while it held %d job(s): it hangs; killing it "
                    "(raise [worker] stall_timeout if the model is just slow)",
                    worker.pid, silent, len(self._streams),
                )
                worker.process.kill()
                break
            except ValueError as exc:  # a line over _LINE_LIMIT
                log.error("the worker (pid %d) wrote an oversized line (%s); restarting it", worker.pid, exc)
                worker.process.kill()
                break
            if not line:
                break
            worker.last_activity = loop.time()
            try:
                message = protocol.decode(line)
            except protocol.ProtocolError as exc:
                # Its stdout is private to the protocol, so this is a bug; a worker we cannot
                # understand might also have lost a job's Done, so replace it rather than hang.
                log.error("the worker (pid %d) broke the protocol (%s); restarting it", worker.pid, exc)
                worker.process.kill()
                break
            self._on_message(worker, message)
        returncode = await worker.process.wait()
        if worker.stderr_reader is not None:
            # Let the last stderr lines arrive: they explain the exit.
            await asyncio.wait({worker.stderr_reader}, timeout=2.0)
        self._on_exit(worker, returncode)

    def _on_message(self, worker: _Worker, message: protocol.Message) -> None:
        if isinstance(message, (protocol.Started, protocol.Deltas, protocol.Done, protocol.JobError)):
            self._streams.route(message, owner=worker)
        elif isinstance(message, protocol.Progress):
            worker.last_progress = message.text  # the worker logs it on stderr, which we forward
        elif isinstance(message, protocol.Ready):
            if not worker.ready.done():
                worker.ready.set_result(message.info)
        elif isinstance(message, protocol.Fatal):
            worker.fatal = message.message
        elif isinstance(message, protocol.Pong):
            answered = self._pings.get(message.nonce)
            if answered is not None and not answered.done():
                answered.set_result(None)
        else:
            log.warning("ignoring a %s message, which only the bot sends", message.TYPE)

    def _on_exit(self, worker: _Worker, returncode: int) -> None:
        how = describe_exit(returncode)
        if not worker.serving:
            # Died (or was given up on) while starting: `_launch` reports it.
            if not worker.ready.done():
                message = worker.fatal or f"the worker exited ({how}) before it was ready"
                worker.ready.set_exception(WorkerStartError(message + worker.tail()))
            return
        if worker is not self._worker:
            return
        self._last_exit = how
        for answered in self._pings.values():
            if not answered.done():
                answered.set_exception(WorkerDead(f"the worker process died ({how})"))
        if self._state == "stopped":
            self._streams.fail(lambda: WorkerDead("the generation client was stopped"), owner=worker)
            return
        lost = self._streams.fail(
            lambda: WorkerDead(f"the worker process died ({how}) while it ran this job"), owner=worker
        )
        log.error(
            "the worker process (pid %d) died: %s; %d running job(s) lost; restarting it%s",
            worker.pid, how, lost, worker.tail(),
        )
        self._state = "restarting"
        self._available = asyncio.get_running_loop().create_future()
        self._restart_task = asyncio.create_task(self._restart(), name="worker-restart")

    async def _restart(self) -> None:
        loop = asyncio.get_running_loop()
        while self._state == "restarting":
            now = loop.time()
            self._failures.append(now)
            while self._failures and now - self._failures[0] > _FAILURE_WINDOW_S:
                self._failures.popleft()
            # The first death in a while restarts at once; a worker that keeps dying waits longer each time.
            delay = 0.0 if len(self._failures) <= 1 else min(0.5 * 2 ** (len(self._failures) - 2), 30.0)
            if delay:
                log.warning("the worker keeps dying; waiting %.1f s before restarting it", delay)
                await asyncio.sleep(delay)
            self._restarts += 1
            try:
                worker = await self._launch()
            except WorkerStartError as exc:
                log.error("restarting the worker failed: %s", exc)
                # Waiting submits get the error now; later ones wait for the next attempt.
                self._settle_available(WorkerDead(f"the worker died and could not be restarted: {exc}"))
                self._available = loop.create_future()
                continue
            if self._state != "restarting":  # stopped meanwhile
                return
            self._state = "ready"
            assert self._available is not None
            self._available.set_result(worker)
            log.info("the worker is back (pid %d, restart number %d)", worker.pid, self._restarts)

    def _settle_available(self, error: Exception) -> None:
        if self._available is not None and not self._available.done():
            self._available.set_exception(error)
            self._available.exception()  # mark it read: with no waiter it would be logged as lost

    async def _terminate(self, worker: _Worker, grace: float = 5.0) -> None:
        if not worker.running:
            await worker.process.wait()
            return
        if grace > 0:
            worker.process.terminate()
            try:
                await asyncio.wait_for(worker.process.wait(), grace)
                return
            except TimeoutError:
                log.warning("the worker (pid %d) ignored SIGTERM; killing it", worker.pid)
        worker.process.kill()
        await worker.process.wait()

    async def _join(self, worker: _Worker) -> None:
        tasks = [task for task in (worker.reader, worker.stderr_reader) if task is not None]
        current = asyncio.current_task()
        await asyncio.gather(*(task for task in tasks if task is not current), return_exceptions=True)

    async def _forward_stderr(self, worker: _Worker) -> None:
        stderr = worker.process.stderr
        assert stderr is not None
        pending = b""
        while True:
            chunk = await stderr.read(65536)
            if not chunk:
                break
            # Progress bars end their lines with \r; treat it as a line end too.
            *lines, pending = re.split(rb"\r\n|\r|\n", pending + chunk)
            for line in lines:
                self._log_worker_line(worker, line)
            if len(pending) > 65536:
                self._log_worker_line(worker, pending)
                pending = b""
        if pending:
            self._log_worker_line(worker, pending)

    def _log_worker_line(self, worker: _Worker, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip()
        if not text:
            return
        worker.stderr_tail.append(text)
        match = _LOG_LINE.fullmatch(text)
        if match:
            level, name, message = match.groups()
            worker_log.log(logging.getLevelName(level), "[pid %d] %s: %s", worker.pid, name, message)
        else:
            worker_log.info("[pid %d] %s", worker.pid, text)

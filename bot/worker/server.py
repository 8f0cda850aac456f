"""The worker process, `python -m bot.worker`: the only process of Parley that imports torch,
transformers and bitsandbytes.

It reads `bot.generation.protocol` lines on stdin and writes them on a private duplicate of
stdout; fd 1 itself is pointed at stderr, so a stray print or progress bar from a library can
never corrupt the protocol. stderr carries the logs, which the subprocess client forwards to the
`parley.worker` logger. The first line is `configure`: the model is loaded (`bot.worker.loading`)
and one `Engine` runs on the main thread, while a reader thread hands it jobs and cancellations.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
from typing import IO

import transformers

from bot.generation import protocol
from bot.worker.engine import Engine
from bot.worker.loading import ModelLoadError, load_model

__all__ = ["main"]

log = logging.getLogger("parley.worker")


class _ProtocolWriter:
    """Writes protocol lines to the private stdout; engine and reader threads share it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: protocol.FromWorker) -> None:
        line = protocol.encode(message)
        try:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            # The bot is gone (its end of the pipe closed): nobody is left to serve.
            log.warning("the bot closed the protocol pipe; exiting")
            logging.shutdown()
            os._exit(0)


class _WorkerServer:
    def __init__(self, writer: _ProtocolWriter) -> None:
        self.writer = writer
        self.engine: Engine | None = None
        self.configure: queue.Queue[protocol.Configure | None] = queue.Queue()
        self._lock = threading.Lock()

    def read_loop(self, stdin: IO[bytes]) -> None:
        for line in stdin:
            if not line.strip():
                continue
            try:
                message = protocol.decode(line)
            except protocol.ProtocolError as exc:
                log.error("ignoring a bad line from the bot: %s", exc)
                continue
            if isinstance(message, protocol.Ping):
                self.writer.send(protocol.Pong(message.nonce))
            elif isinstance(message, protocol.Configure):
                self.configure.put(message)
            elif isinstance(message, protocol.Shutdown):
                break
            elif isinstance(message, protocol.Submit):
                with self._lock:
                    engine = self.engine
                if engine is None:
                    self.writer.send(protocol.JobError(message.job_id, "the worker is still loading its model"))
                else:
                    engine.submit(message.job_id, message.messages, message.settings)
            elif isinstance(message, protocol.Cancel):
                with self._lock:
                    engine = self.engine
                if engine is not None:
                    engine.cancel(message.job_id)
            else:
                log.error("ignoring a %s message, which only the worker sends", message.TYPE)
        # Shutdown, or stdin closed because the bot exited: stop either way.
        with self._lock:
            engine = self.engine
            self.engine = None
        if engine is not None:
            engine.stop()
        else:
            # Still loading (or never configured): loading cannot be interrupted, and nobody waits.
            logging.shutdown()
            os._exit(0)

    def serve(self, stdin: IO[bytes]) -> int:
        threading.Thread(target=self.read_loop, args=(stdin,), name="protocol-reader", daemon=True).start()
        configure = self.configure.get()
        if configure is None:
            return 0

        def progress(stage: str, text: str) -> None:
            log.info("%s: %s", stage, text)
            self.writer.send(protocol.Progress(stage, text))

        try:
            loaded = load_model(configure.model, configure.worker, progress)
        except ModelLoadError as exc:
            log.error("%s", exc)
            self.writer.send(protocol.Fatal(str(exc)))
            return 1
        except Exception as exc:
            log.exception("loading the model failed")
            self.writer.send(
                protocol.Fatal(f"loading the model failed ({type(exc).__name__}: {exc}); check [model] model")
            )
            return 1
        worker = configure.worker
        engine = Engine(
            loaded,
            emit=self.writer.send,
            ignore_eos=configure.ignore_eos,
            prefix_cache=worker.prefix_cache,
            prefix_cache_bytes=worker.prefix_cache_mb * 2**20,
            prefill_chunk_tokens=worker.prefill_chunk_tokens,
            draft_tokens=worker.draft_tokens,
        )
        with self._lock:
            self.engine = engine
        info = loaded.info
        log.info(
            "ready: %s, %s, %s on %s, context %d, batches of up to %d, loaded in %.1f s",
            info.name, info.quantization, info.dtype, info.device, info.context_window, info.max_batch,
            info.load_seconds,
        )
        self.writer.send(protocol.Ready(info))
        engine.run()
        return 0


class _OncePerMessage(logging.Filter):
    """Lets a library's identical log line through once: some (bitsandbytes) repeat one on every matmul."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("parley") or record.levelno >= logging.ERROR:
            return True
        key = (record.name, str(record.msg))
        if key in self._seen:
            return False
        if len(self._seen) < 10_000:
            self._seen.add(key)
        return True


def main() -> int:
    """Entry point of `python -m bot.worker`."""
    # From here on, whatever a library prints lands on stderr; only the protocol writer holds the
    # real stdout.
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OncePerMessage())
    logging.captureWarnings(True)
    transformers.utils.logging.disable_progress_bar()
    # Ctrl-C in a terminal reaches the whole process group; the bot decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer = _ProtocolWriter(os.fdopen(protocol_fd, "wb"))
    return _WorkerServer(writer).serve(sys.stdin.buffer)

"""What the two worker-backed clients share: one stream per job fed by the worker's messages
(`JobStreams`), `submit` and `cancel` on top of it (`WorkerClientBase`), and `describe_exit`.

A worker is anything that speaks `bot.generation.protocol`: the worker process
(`SubprocessGenerationClient`) or the engine on a thread of this process
(`InProcessGenerationClient`), so a job's stream means the same thing whichever runs it.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from bot.core.errors import JobFailed
from bot.generation import protocol
from bot.generation.client import GenerationClient, GenerationRequest, GenerationResult, TextDelta

__all__ = ["Send", "JobStreams", "WorkerClientBase", "describe_exit"]

log = logging.getLogger("parley.generation")


def describe_exit(returncode: int | None) -> str:
    """ "exit code 1" or "killed by signal SIGKILL", for logs and error messages."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


Send = Callable[[protocol.ToWorker], None]
"""How a client hands a message to one worker (its stdin, or the in-process engine)."""


@dataclass(eq=False)
class _JobEntry:
    queue: asyncio.Queue[TextDelta | GenerationResult | Exception]
    owner: object
    send: Send


class JobStreams:
    """The bot's side of running jobs: one asyncio queue per job id, fed with worker messages.

    Both clients use it, so a job's stream means the same thing whichever backend runs it.
    """

    def __init__(self) -> None:
        self._jobs: dict[int, _JobEntry] = {}
        self.batches = 0
        self.largest_batch = 0
        self._last_batch: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def open(self, job_id: int, owner: object, send: Send) -> _JobEntry:
        entry = _JobEntry(asyncio.Queue(), owner, send)
        self._jobs[job_id] = entry
        return entry

    def close(self, job_id: int, entry: _JobEntry) -> None:
        if self._jobs.get(job_id) is entry:
            del self._jobs[job_id]

    def get(self, job_id: int) -> _JobEntry | None:
        return self._jobs.get(job_id)

    def route(self, message: protocol.FromWorker, owner: object = None) -> None:
        """Deliver a job message (started, deltas, done, error) to its job's queue."""
        if isinstance(message, protocol.Deltas):
            for job_id, text in message.texts.items():
                entry = self._jobs.get(job_id)
                if entry is not None:
                    entry.queue.put_nowait(TextDelta(text))
        elif isinstance(message, protocol.Done):
            entry = self._jobs.pop(message.job_id, None)
            if entry is not None:
                entry.queue.put_nowait(message.result)
        elif isinstance(message, protocol.JobError):
            entry = self._jobs.pop(message.job_id, None)
            if entry is not None:
                entry.queue.put_nowait(JobFailed(message.message))
        elif isinstance(message, protocol.Started):
            key = (id(owner), message.batch)
            if key != self._last_batch:
                self._last_batch = key
                self.batches += 1
            # Jobs join a running batch, so its size grows after it started.
            self.largest_batch = max(self.largest_batch, message.batch_size)
        else:
            log.warning("ignoring an unexpected %s message from the worker", message.TYPE)

    def fail(self, make_error: Callable[[], Exception], owner: object | None = None) -> int:
        """End every job (of `owner`, if given) with a fresh error from `make_error`; return how many."""
        doomed = [job_id for job_id, entry in self._jobs.items() if owner is None or entry.owner is owner]
        for job_id in doomed:
            self._jobs.pop(job_id).queue.put_nowait(make_error())
        return len(doomed)


class WorkerClientBase(GenerationClient):
    """What both clients share: `submit` streams from `JobStreams`, `cancel` asks the job's worker.

    A subclass provides `_acquire()`: wait until a worker can take a job and return how to send
    it messages, plus an owner token that identifies that worker.
    """

    def __init__(self) -> None:
        self._streams = JobStreams()
        self._acquiring: set[int] = set()
        self._cancelled_early: set[int] = set()

    @abc.abstractmethod
    async def _acquire(self) -> tuple[Send, object]:
        """(send, owner) of a worker that is ready; raise `WorkerDead` if there is none to wait for."""

    async def submit(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        job_id = request.job_id
        if job_id in self._streams or job_id in self._acquiring:
            raise JobFailed(f"job {job_id} is already running")
        self._acquiring.add(job_id)
        try:
            send, owner = await self._acquire()
        finally:
            self._acquiring.discard(job_id)
            cancelled_early = job_id in self._cancelled_early
            self._cancelled_early.discard(job_id)
        if cancelled_early:  # cancelled while it waited for a worker to come up
            yield GenerationResult(finish_reason="cancelled", prompt_tokens=0, completion_tokens=0)
            return
        entry = self._streams.open(job_id, owner, send)
        finished = False
        try:
            send(protocol.Submit(job_id, request.messages, request.settings))
            while True:
                item = await entry.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                if isinstance(item, GenerationResult):
                    finished = True
                    yield item
                    return
                yield item
        finally:
            self._streams.close(job_id, entry)
            if not finished:
                # The caller walked away from the stream (or was cancelled): free the batch row.
                send(protocol.Cancel(job_id))

    async def cancel(self, job_id: int) -> None:
        entry = self._streams.get(job_id)
        if entry is not None:
            entry.send(protocol.Cancel(job_id))
        elif job_id in self._acquiring:
            self._cancelled_early.add(job_id)

    def _stream_stats(self) -> dict[str, object]:
        return {"batches": self._streams.batches, "largest_batch": self._streams.largest_batch}

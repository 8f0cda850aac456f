"""GenerationQueue: persisted jobs, fair dispatch to the backend, replies streamed to adapters.

Jobs live in the database (queued → running → done | failed | cancelled), so a crash loses
none: at start-up every job left `running` is queued again. The order is `FairScheduler`'s (at
most one job per conversation at a time, round-robin across conversations, suspects alone); one
attempt at a job is `JobAttempts.run`.

Several bot processes may share the database; what must hold across them is stored, not kept
here: the claim refuses a second running job in a conversation, and a watch (`_watch`, every
`poll_interval`) reads the stored state of the jobs this process runs or waits on, so a
cancellation, a finish or a takeover in any process reaches this one within a second, and
re-queues a job this process still owns in the database but no longer works on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.core.config import QueueSettings
from bot.core.context import current_job
from bot.core.contracts import Adapter
from bot.core.errors import JobNotOwned, StorageError
from bot.core.types import IncomingMessage, JobKind, JobStatus
from bot.generation.client import GenerationClient
from bot.jobs.attempt import AttemptOutcome, AttemptPolicy, JobAttempts
from bot.jobs.scheduler import FairScheduler, QueuedJob

if TYPE_CHECKING:
    from storage import Job, Repository

__all__ = ["GenerationQueue"]

log = logging.getLogger("parley.queue")

TERMINAL = {JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value}


class GenerationQueue:
    """Owns every job from enqueue to its final reply."""

    def __init__(
        self,
        repo: Repository,
        client: GenerationClient,
        adapters: Mapping[str, Adapter],
        *,
        limits: QueueSettings,
        policy: AttemptPolicy,
        max_batch: int,
    ) -> None:
        self.repo = repo
        self.client = client
        self.limits = limits
        self.max_batch = max_batch
        self.attempts = JobAttempts(repo, client, adapters, policy)
        self.scheduler = FairScheduler()
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self.poll_interval = 0.5
        """Seconds between two looks at the stored state of the jobs run or waited on here."""
        self.rescan_interval = 5.0
        """Seconds between dispatches that look for jobs queued by other processes."""
        self._tasks: dict[int, asyncio.Task] = {}
        self._running_conversations: dict[int, int] = {}  # job id → conversation id
        self._waiters: dict[int, list[asyncio.Future[str]]] = defaultdict(list)
        self._isolated: int | None = None  # a suspect running alone after a backend went down
        self._parked: set[int] = set()  # conversations of platforms not running in this process
        self._owned_last = True  # the last watch saw running jobs of this owner (first: look)
        self.stats: Counter[str] = Counter()
        """Jobs that reached a final state here, by status ("done", "failed", "cancelled")."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.repo.set_active(True)
        interrupted = await self.repo.requeue_interrupted()
        if interrupted:
            log.warning("%d job(s) were interrupted by a crash or shutdown; queued again", interrupted)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="parley-dispatcher")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="parley-heartbeat")
        self._watcher = asyncio.create_task(self._watch_loop(), name="parley-watch")
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._dispatcher, self._heartbeat, self._watcher, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = self._heartbeat = self._watcher = None
        self.repo.set_active(False)
        # Jobs cut off here stay `running` in the database and are queued again at next start-up.

    async def __aenter__(self) -> GenerationQueue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what the router asks --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        info = self.client.model_info
        return info.max_batch if info else self.max_batch

    async def enqueue(self, conversation_id: int, message: IncomingMessage, text: str):  # noqa: ANN201
        """Record the user's message and queue a job for it, in one transaction. Returns
        (job, created); a message seen before creates nothing. Raises QueueFull (the message
        itself is kept as context)."""
        _, job, created = await self.repo.record_and_enqueue(
            conversation_id,
            author_id=message.author.id,
            author_name=message.author.name,
            text=text,
            platform_message_id=message.message_id,
            reply_to=message.reply_to,
            max_pending=self.limits.max_pending,
            max_pending_per_conversation=self.limits.max_pending_per_conversation,
            max_pending_per_user=self.limits.max_pending_per_user,
        )
        if created:
            self._wake.set()
        return job, created

    async def enqueue_followup(self, parent_job_id: int, kind: JobKind) -> tuple[Job, bool]:
        """Queue a Regenerate or Continue of the parent job's reply, within the same bounds as a
        message (raises QueueFull); it waits its turn in the fair order like any job. Returns
        (job, created): created is False when one was already waiting for that reply."""
        job, created = await self.repo.enqueue_followup(
            parent_job_id,
            kind,
            max_pending=self.limits.max_pending,
            max_pending_per_conversation=self.limits.max_pending_per_conversation,
            max_pending_per_user=self.limits.max_pending_per_user,
        )
        if created:
            self._wake.set()
        return job, created

    async def stop_reply(self, job_id: int) -> bool:
        """The Stop control: the job is cancelled in storage and its generation stops at the next
        decode step (in this process now, in another within `poll_interval`); what was shown is
        kept as a stopped reply. False when the job had already ended."""
        stopped = await self.repo.stop_job(job_id)
        if stopped:
            await self._cancelled_in_storage([job_id])
        return stopped

    async def reset(self, conversation_id: int, *, system_prompt: str | None) -> tuple[int, int]:
        """Archive the history, cancel pending and running jobs. Returns (archived, cancelled)."""
        kwargs = {} if system_prompt is None else {"system_prompt": system_prompt}
        archived, cancelled_ids = await self.repo.reset_conversation(conversation_id, **kwargs)
        await self._cancelled_in_storage(cancelled_ids)
        return archived, len(cancelled_ids)

    async def forget(self, conversation_id: int, author_id: str) -> tuple[int, int]:
        """A user's `/forget`: their messages and the replies to them leave the history; their
        waiting and running jobs are cancelled. Returns (archived, cancelled)."""
        # Their replies being written stop too (in whichever process writes them); one that
        # finishes in the same instant is stored archived (its question is), out of the history.
        archived, cancelled_ids = await self.repo.forget_author(conversation_id, author_id)
        await self._cancelled_in_storage(cancelled_ids)
        return archived, len(cancelled_ids)

    async def _cancelled_in_storage(self, job_ids: list[int]) -> None:
        """Jobs just cancelled in the database: waiters learn it, and a reply being written here
        stops now (another process's watch stops its own within `poll_interval`)."""
        for job_id in job_ids:
            if job_id in self._tasks:  # its attempt ends the waits when it has shown the stop
                await self._stop_generation(job_id)
            else:
                self._resolve(job_id, JobStatus.CANCELLED.value)

    async def _stop_generation(self, job_id: int) -> None:
        if job_id not in self.attempts.cancelled_jobs:
            self.attempts.cancelled(job_id)
            await self.client.cancel(job_id)

    async def depth(self) -> int:
        return await self.repo.pending_count()

    async def dispatch_order(self) -> list[int]:
        """Queued job ids in the order they will be dispatched: the scheduler's one order."""
        return [job.id for job in await self._order()]

    async def position_of(self, job_id: int) -> int | None:
        """1 for a running job or the next to go, 2 for the one after, ...; None if not pending."""
        if job_id in self._running_conversations:
            return 1
        position = FairScheduler.position(await self._order(), job_id)
        if position is None:
            job = await self.repo.get_job(job_id)
            return 1 if job is not None and job.status == JobStatus.RUNNING.value else None  # elsewhere
        return position

    async def _order(self) -> list[QueuedJob]:
        queued = [QueuedJob(job.id, job.conversation_id, job.attempts) for job in await self.repo.queued_jobs()]
        return self.scheduler.order(queued, parked=self._parked)

    async def position_for_author(self, conversation_id: int, author_id: str) -> int | None:
        for job in await self.repo.pending_jobs_for(conversation_id):
            message = await self.repo.get_message(job.message_id)
            if message is not None and message.author_id == author_id:
                return await self.position_of(job.id)
        return None

    async def wait_for(self, job_id: int) -> str:
        """Wait until the job is done, failed or cancelled, in any process (the stored state ends
        every wait: see `_watch`); returns that status."""
        job = await self.repo.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        # A job whose attempt runs here ends its waits itself, once it has shown how it ended
        # (a reply cancelled in storage still has "[stopped]" to show).
        if job.status in TERMINAL and job_id not in self._tasks:
            return job.status
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job_id].append(future)
        # Re-check: the job may have ended between the read and the registration.
        job = await self.repo.get_job(job_id)
        if job is not None and job.status in TERMINAL and job_id not in self._tasks:
            self._resolve(job_id, job.status)
        return await future

    async def run_until_empty(self, timeout: float = 60.0) -> None:
        """Wait until no job is queued or running (tests and benchmarks)."""
        async def drained() -> None:
            while True:
                if not self._tasks and await self.repo.pending_count() == 0:
                    return
                self._wake.set()
                await asyncio.sleep(0.02)

        await asyncio.wait_for(drained(), timeout)

    async def _heartbeat_loop(self) -> None:
        """Several bot processes may share one database: this process's running jobs carry its
        heartbeat, and a sibling that died (its heartbeat stale) has its jobs taken over here."""
        beats = 0
        while True:
            await asyncio.sleep(self.repo.heartbeat_interval.total_seconds())
            beats += 1
            try:
                await self.repo.heartbeat()
                if beats % 3 == 0 and await self.repo.requeue_interrupted(own_jobs=False):
                    log.warning("took over jobs from a bot process that stopped answering")
                    self._wake.set()
            except StorageError as exc:
                log.warning("could not refresh the running jobs' heartbeat: %s", exc)
            except Exception:  # it must outlive anything: siblings take over jobs without it
                log.exception("the heartbeat failed unexpectedly; beating on")

    async def _watch_loop(self) -> None:
        since_rescan = 0.0
        while True:
            await asyncio.sleep(self.poll_interval)
            since_rescan += self.poll_interval
            if since_rescan >= self.rescan_interval:  # jobs queued by other processes
                since_rescan = 0.0
                self._wake.set()
            try:
                await self._watch()
            except StorageError as exc:
                log.warning("could not read the state of the running jobs: %s", exc)
            except Exception:
                log.exception("watching the running jobs failed unexpectedly; watching on")

    async def _watch(self) -> None:
        """One look at the stored state of the jobs this process runs or waits on.

        A job cancelled in storage (a /reset or /forget in any process) stops its generation here;
        one another process owns now stops without storing anything; a final state ends the waits
        on it; a job stored as running under this owner with no task here (its finishing failed)
        is queued again, so it is answered and the user's slot freed.
        """
        claimed = self.attempts.claimed  # before the reads: a claim made after them is not judged
        waited = [job_id for job_id, futures in self._waiters.items() if futures]
        if not claimed and not waited and not self._tasks and not self._owned_last:
            owned: list[int] = []
        else:
            owned = await self.repo.owned_running_jobs()
        states = await self.repo.job_states(sorted(set(claimed) | set(waited)))
        me = self.repo.owner
        for job_id in claimed:
            status, owner = states.get(job_id, (None, None))
            if status is JobStatus.CANCELLED:
                await self._stop_generation(job_id)
            elif owner != me or status is JobStatus.QUEUED:
                if job_id in self._tasks:
                    self.attempts.lost(job_id)
                    await self.client.cancel(job_id)
        for job_id in waited:
            status, _ = states.get(job_id, (None, None))
            # An attempt here ends the waits itself once it has shown the outcome; the watch ends
            # those on jobs finished elsewhere (or left with no attempt here).
            if status is not None and status.value in TERMINAL and job_id not in self._tasks:
                self._resolve(job_id, status.value)
        stranded = [job_id for job_id in owned if job_id not in self._tasks]
        self._owned_last = bool(owned)
        if stranded and await self.repo.requeue_stranded(stranded):
            log.warning("job(s) %s were running here with no attempt left (finishing failed); queued again", stranded)
            self._wake.set()

    # -- dispatch --------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_ready_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dispatching jobs failed; trying again shortly")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _dispatch_ready_jobs(self) -> None:
        order = await self._order()
        if not order:
            return
        # Conversations with a running job anywhere: the claim would refuse their jobs.
        busy = set(self._running_conversations.values()) | await self.repo.busy_conversations()
        picks = self.scheduler.pick(
            order,
            busy_conversations=busy,
            running=len(self._tasks),
            capacity=self.capacity,
            isolated=self._isolated is not None,
        )
        for job in picks:
            if job.suspect:
                self._isolated = job.id
                log.info("job %d was in a backend that went down; running it alone", job.id)
            self._launch(job.id, job.conversation_id)

    def _launch(self, job_id: int, conversation_id: int) -> None:
        self.scheduler.served(conversation_id)
        self._running_conversations[job_id] = conversation_id
        self._tasks[job_id] = asyncio.create_task(self._run_job(job_id, conversation_id), name=f"parley-job-{job_id}")

    async def _run_job(self, job_id: int, conversation_id: int) -> None:
        current_job.set(job_id)  # this task's own context: every log line below carries the job
        outcome: AttemptOutcome | None = None
        try:
            outcome = await self.attempts.run(job_id, conversation_id)
        except asyncio.CancelledError:
            raise
        except JobNotOwned as exc:
            outcome = await self.attempts.abandon(job_id, exc)
        except Exception as exc:
            log.exception("job %d failed unexpectedly", job_id)
            try:
                await self.repo.fail_job(job_id, f"internal error: {type(exc).__name__}")
            except JobNotOwned as lost:
                outcome = await self.attempts.abandon(job_id, lost)
            except StorageError as again:
                # Still running in the database, with no attempt here: `_watch` queues it again.
                log.warning("job %d could not be marked failed either (%s); it will be answered again", job_id, again)
            else:
                await self.attempts.notify_failure(job_id, messages.JOB_CRASHED)
                outcome = AttemptOutcome.FAILED
        finally:
            self.attempts.ended(job_id)
            self._owned_last = True  # the next watch looks for it in the database
            self._tasks.pop(job_id, None)
            self._running_conversations.pop(job_id, None)
            if self._isolated == job_id:
                self._isolated = None
            if outcome is AttemptOutcome.PARKED:
                self._parked.add(conversation_id)
            if outcome is not None and outcome.final:
                self.attempts.forget(job_id)
                self._resolve(job_id, outcome.value)
                self.stats[outcome.value] += 1
            self._wake.set()

    def _resolve(self, job_id: int, status: str) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(status)

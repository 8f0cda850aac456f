"""GenerationQueue: persisted jobs, fair dispatch to the worker, replies streamed to adapters.

Jobs live in the database (queued → running → done | failed | cancelled), so a crash loses
none: at start-up every job left `running` is queued again. At most one job per conversation
runs at a time (its history must stay in order); across conversations the queue goes round-robin
(the conversation served longest ago goes first), up to the worker's batch size at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.core.errors import BackendDown, JobFailed, StorageError
from bot.generation.client import GenerationRequest, GenerationResult, TextDelta
from bot.conversation.history import build_chat, effective_settings
from bot.core.types import ConversationKey, IncomingMessage, JobStatus

if TYPE_CHECKING:
    from adapters.base import Adapter, ReplyStream
    from storage import Repository

    from bot.core.config import Settings
    from bot.generation.client import GenerationClient

__all__ = ["GenerationQueue", "current_job"]

# The job being worked on, for log lines written anywhere beneath `_run_job` (see bot.runtime.cli).
current_job: contextvars.ContextVar[int | None] = contextvars.ContextVar("parley_job", default=None)

log = logging.getLogger("parley.queue")

TERMINAL = {JobStatus.DONE.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value}


class GenerationQueue:
    """Owns every job from enqueue to its final reply."""

    def __init__(
        self, settings: Settings, repo: Repository, client: GenerationClient, adapters: Mapping[str, Adapter]
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.client = client
        self.adapters = adapters
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._heartbeat: asyncio.Task | None = None
        self._tasks: dict[int, asyncio.Task] = {}
        self._running_conversations: dict[int, int] = {}  # job id → conversation id
        self._streams: dict[int, ReplyStream] = {}  # kept across retries after a worker death
        self._waiters: dict[int, list[asyncio.Future[str]]] = defaultdict(list)
        self._served = 0
        self._last_served: dict[int, int] = {}  # conversation id → dispatch counter
        self._cancelled: set[int] = set()
        self._isolated: int | None = None  # a job running alone after a worker death
        self._parked: set[int] = set()  # conversations of platforms not running in this process
        self.stats = {"dispatched": 0, "done": 0, "failed": 0, "cancelled": 0, "retried": 0}

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        interrupted = await self.repo.requeue_interrupted()
        if interrupted:
            log.warning("%d job(s) were interrupted by a crash or shutdown; queued again", interrupted)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="parley-dispatcher")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="parley-heartbeat")
        self._wake.set()

    async def stop(self) -> None:
        tasks = [t for t in (self._dispatcher, self._heartbeat, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = self._heartbeat = None
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
        return info.max_batch if info else self.settings.worker.max_batch

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
            max_pending=self.settings.queue.max_pending,
            max_pending_per_conversation=self.settings.queue.max_pending_per_conversation,
            max_pending_per_user=self.settings.queue.max_pending_per_user,
        )
        if created:
            self._wake.set()
        return job, created

    async def reset(self, conversation_id: int, *, system_prompt: str | None) -> tuple[int, int]:
        """Archive the history, cancel pending and running jobs. Returns (archived, cancelled)."""
        kwargs = {} if system_prompt is None else {"system_prompt": system_prompt}
        archived, cancelled_ids = await self.repo.reset_conversation(conversation_id, **kwargs)
        for job_id in cancelled_ids:
            self._resolve(job_id, JobStatus.CANCELLED.value)
        running = [job for job, conv in self._running_conversations.items() if conv == conversation_id]
        for job_id in running:
            self._cancelled.add(job_id)
            await self.client.cancel(job_id)
        return archived, len(cancelled_ids) + len(running)

    async def forget(self, conversation_id: int, author_id: str) -> tuple[int, int]:
        """A user's `/forget`: their messages and the replies to them leave the history; their
        waiting jobs are cancelled. Returns (archived, cancelled)."""
        archived, cancelled_ids = await self.repo.forget_author(conversation_id, author_id)
        for job_id in cancelled_ids:
            self._resolve(job_id, JobStatus.CANCELLED.value)
        return archived, len(cancelled_ids)

    async def depth(self) -> int:
        return await self.repo.pending_count()

    async def dispatch_order(self) -> list[int]:
        """Queued job ids in the order they will be dispatched (round-robin by conversation)."""
        per_conversation: dict[int, list[int]] = defaultdict(list)
        for job in await self.repo.queued_jobs():
            per_conversation[job.conversation_id].append(job.id)
        conversations = sorted(per_conversation, key=lambda c: (self._last_served.get(c, -1), per_conversation[c][0]))
        order: list[int] = []
        depth = max((len(v) for v in per_conversation.values()), default=0)
        for round_ in range(depth):
            order += [per_conversation[c][round_] for c in conversations if round_ < len(per_conversation[c])]
        return order

    async def position_of(self, job_id: int) -> int | None:
        """1 for a running job or the next to go, 2 for the one after, ...; None if not pending."""
        if job_id in self._running_conversations:
            return 1
        order = await self.dispatch_order()
        return order.index(job_id) + 1 if job_id in order else None

    async def position_for_author(self, conversation_id: int, author_id: str) -> int | None:
        for job in await self.repo.pending_jobs_for(conversation_id):
            message = await self.repo.get_message(job.message_id)
            if message is not None and message.author_id == author_id:
                return await self.position_of(job.id)
        return None

    async def wait_for(self, job_id: int) -> str:
        job = await self.repo.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.status in TERMINAL:
            return job.status
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters[job_id].append(future)
        # Re-check: the job may have ended between the read and the registration.
        job = await self.repo.get_job(job_id)
        if job is not None and job.status in TERMINAL:
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
        from storage import HEARTBEAT_INTERVAL

        beats = 0
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL.total_seconds())
            beats += 1
            try:
                await self.repo.heartbeat()
                if beats % 3 == 0 and await self.repo.requeue_interrupted(own_jobs=False):
                    log.warning("took over jobs from a bot process that stopped answering")
                    self._wake.set()
            except StorageError as exc:
                log.warning("could not refresh the running jobs' heartbeat: %s", exc)

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
        if self._isolated is not None:
            return  # a suspect runs alone
        queued = [job for job in await self.repo.queued_jobs() if job.conversation_id not in self._parked]
        # A job that was in the worker when it died is a suspect: it may be the one that kills
        # it. Suspects run alone, after the running batch drains, so a poisoned job fails by
        # itself (after max_attempts) and never takes the other conversations' jobs down with it.
        suspect = next((job for job in queued if job.attempts > 0), None)
        if suspect is not None:
            if not self._tasks:
                self._isolated = suspect.id
                log.info("job %d was in a worker that died; running it alone", suspect.id)
                self._launch(suspect.id, suspect.conversation_id)
            return
        free = self.capacity - len(self._tasks)
        if free <= 0:
            return
        busy = set(self._running_conversations.values())
        for job_id, conversation_id in self._next_jobs(queued, busy, free):
            self._launch(job_id, conversation_id)

    def _launch(self, job_id: int, conversation_id: int) -> None:
        self._served += 1
        self._last_served[conversation_id] = self._served
        self._running_conversations[job_id] = conversation_id
        self._tasks[job_id] = asyncio.create_task(self._run_job(job_id, conversation_id), name=f"parley-job-{job_id}")
        self.stats["dispatched"] += 1

    def _next_jobs(self, queued: list, busy: set[int], free: int) -> list[tuple[int, int]]:
        """The first queued job of each idle conversation, least recently served first."""
        first: dict[int, int] = {}
        for job in queued:
            if job.conversation_id not in busy and job.conversation_id not in first:
                first[job.conversation_id] = job.id
        ordered = sorted(first, key=lambda c: (self._last_served.get(c, -1), first[c]))
        return [(first[c], c) for c in ordered[:free]]

    async def _run_job(self, job_id: int, conversation_id: int) -> None:
        current_job.set(job_id)  # this task's own context: every log line below carries the job
        final: str | None = None
        try:
            final = await self._generate(job_id, conversation_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %d failed unexpectedly", job_id)
            await self.repo.fail_job(job_id, f"internal error: {type(exc).__name__}")
            await self._notify_failure(job_id, messages.JOB_CRASHED)
            final = JobStatus.FAILED.value
        finally:
            self._tasks.pop(job_id, None)
            self._running_conversations.pop(job_id, None)
            if self._isolated == job_id:
                self._isolated = None
            if final is not None:
                self._streams.pop(job_id, None)
                self._cancelled.discard(job_id)
                self._resolve(job_id, final)
                self.stats[final] = self.stats.get(final, 0) + 1
            self._wake.set()

    async def _generate(self, job_id: int, conversation_id: int) -> str | None:
        """Run one attempt of a job; returns its final status, or None when it was queued again."""
        conversation = await self.repo.get_conversation(conversation_id)
        adapter = self.adapters.get(conversation.platform)
        if adapter is None:
            # Accepted while that platform ran; it waits, queued, until the platform is back.
            self._parked.add(conversation_id)
            log.warning("conversation %d waits: the %s adapter is not running", conversation_id, conversation.platform)
            return None
        job = await self.repo.get_job(job_id)
        trigger = await self.repo.get_message(job.message_id)
        history = await self.repo.history(conversation_id, up_to_message_id=job.message_id)
        chat = build_chat(conversation, history, self.settings.bot.system_prompt)
        settings = effective_settings(conversation, self.settings.generation)
        if not await self.repo.mark_running(job_id, [m.to_dict() for m in chat]):
            return None  # cancelled between dispatch and now
        key = ConversationKey(conversation.platform, conversation.key)
        stream = self._streams.get(job_id)
        if stream is None:
            # After a crash, the messages the interrupted attempt posted are edited, not reposted.
            resume = job.reply_platform_ids or ()
            stream = await adapter.open_reply(key, trigger.platform_message_id if trigger else None, resume)
            self._streams[job_id] = stream
        text = ""
        result: GenerationResult | None = None
        saved_ids = list(job.reply_platform_ids or ())
        try:
            async for event in self.client.submit(GenerationRequest(job_id, chat, settings)):
                if isinstance(event, TextDelta):
                    text += event.text
                    if text.strip():
                        await stream.update(text.lstrip())  # as the final reply will be: stripped
                        if stream.posted_ids != saved_ids:  # a new message was posted: remember it
                            saved_ids = stream.posted_ids
                            await self.repo.set_reply_platform_ids(job_id, saved_ids)
                else:
                    result = event
        except BackendDown as exc:
            attempts = await self.repo.requeue_job(job_id, f"worker died: {exc}")
            if attempts >= self.settings.worker.max_attempts:
                log.error("job %d: the worker died %d times while answering it; giving up", job_id, attempts)
                await self.repo.fail_job(job_id, f"worker died {attempts} times")
                await stream.fail(messages.backend_gave_up(attempts))
                return JobStatus.FAILED.value
            log.warning("job %d: the worker died (attempt %d of %d); it will be retried", job_id, attempts, self.settings.worker.max_attempts)
            self.stats["retried"] += 1
            return None
        except JobFailed as exc:
            await self.repo.fail_job(job_id, str(exc))
            await stream.fail(messages.job_failed(str(exc)))
            return JobStatus.FAILED.value
        if job_id in self._cancelled or (result is not None and result.finish_reason == "cancelled"):
            await self.repo.cancel_job(job_id)
            if text.strip():
                await stream.finish(f"{text}\n{messages.STOPPED}")
            else:
                await stream.fail(messages.STOPPED)
            return JobStatus.CANCELLED.value
        reply = text.strip() or messages.EMPTY_REPLY
        platform_ids = await stream.finish(reply)
        await self.repo.finish_job(
            job_id,
            reply_text=reply,
            author_id="parley",
            author_name=self.settings.bot.name,
            platform_message_id=platform_ids[0] if platform_ids else None,
        )
        return JobStatus.DONE.value

    async def _notify_failure(self, job_id: int, notice: str) -> None:
        stream = self._streams.get(job_id)
        if stream is not None:
            try:
                await stream.fail(notice)
            except Exception:
                log.exception("could not tell the user that job %d failed", job_id)

    def _resolve(self, job_id: int, status: str) -> None:
        for future in self._waiters.pop(job_id, []):
            if not future.done():
                future.set_result(status)

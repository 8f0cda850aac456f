"""One attempt at a job, from the stored conversation to the stored reply.

Builds the chat from the history, marks the job running (storing the prompt), opens (or, after a
crash, resumes) the adapter's reply stream, streams the backend's deltas into it while persisting
each posted message id, and stores the outcome: done, failed, cancelled, or queued again when the
backend went down while holding it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.conversation.history import MESSAGE_OVERHEAD_CHARS, build_chat, effective_settings, history_char_budget
from bot.core.contracts import Adapter, Control, ReplyStream
from bot.core.errors import BackendBusy, BackendDown, JobFailed
from bot.core.types import ChatMessage, ConversationKey, GenerationSettings, JobKind, JobStatus, Role
from bot.generation.client import GenerationClient, GenerationRequest, GenerationResult, TextDelta

if TYPE_CHECKING:
    from storage import Job, Repository

__all__ = ["AttemptOutcome", "AttemptPolicy", "JobAttempts"]

log = logging.getLogger("parley.queue")


class AttemptOutcome(enum.Enum):
    DONE = JobStatus.DONE.value
    FAILED = JobStatus.FAILED.value
    CANCELLED = JobStatus.CANCELLED.value
    REQUEUED = "requeued"
    """The backend went down while holding the job; it is queued again for another attempt."""
    PARKED = "parked"
    """The conversation's platform does not run in this process; the job stays queued."""
    NOT_STARTED = "not_started"
    """The job was no longer queued when the attempt began (cancelled in between), or its
    conversation has a running job (in any process)."""
    LOST = "lost"
    """Another process owns the job now (it took it over): this attempt stopped, storing nothing."""

    @property
    def final(self) -> bool:
        return self in (AttemptOutcome.DONE, AttemptOutcome.FAILED, AttemptOutcome.CANCELLED)


@dataclass(frozen=True, slots=True)
class AttemptPolicy:
    """What an attempt needs from the configuration."""

    default_system_prompt: str
    default_settings: GenerationSettings
    bot_name: str
    max_attempts: int


class JobAttempts:
    """Runs attempts; keeps each job's reply stream across attempts (a retry edits what the
    interrupted attempt showed) and knows which jobs were cancelled while running."""

    def __init__(
        self, repo: Repository, client: GenerationClient, adapters: Mapping[str, Adapter], policy: AttemptPolicy
    ) -> None:
        self.repo = repo
        self.client = client
        self.adapters = adapters
        self.policy = policy
        self._streams: dict[int, ReplyStream] = {}
        self._cancelled: set[int] = set()
        self._lost: set[int] = set()
        self._claimed: set[int] = set()

    @property
    def claimed(self) -> frozenset[int]:
        """Jobs an attempt here holds the claim of right now (marked running by this process)."""
        return frozenset(self._claimed)

    @property
    def cancelled_jobs(self) -> frozenset[int]:
        return frozenset(self._cancelled)

    def cancelled(self, job_id: int) -> None:
        """The job was cancelled while running; its attempt stores it as cancelled."""
        self._cancelled.add(job_id)

    def lost(self, job_id: int) -> None:
        """Another process owns the running job now; its attempt here stops and stores nothing."""
        self._lost.add(job_id)

    async def abandon(self, job_id: int, reason: object) -> AttemptOutcome:
        """Stop an attempt whose job another process owns now: its generation is cancelled and
        nothing more is stored or shown (the owner edits the messages already posted)."""
        log.warning("job %d: another process owns it now; this attempt stops (%s)", job_id, reason)
        self._claimed.discard(job_id)
        self._streams.pop(job_id, None)
        await self.client.cancel(job_id)
        return AttemptOutcome.LOST

    def ended(self, job_id: int) -> None:
        """The attempt at the job ended, however: it no longer holds the claim."""
        self._claimed.discard(job_id)

    def forget(self, job_id: int) -> None:
        """The job reached a final state; drop what was kept for its retries."""
        self._streams.pop(job_id, None)
        self._cancelled.discard(job_id)
        self._lost.discard(job_id)

    async def notify_failure(self, job_id: int, notice: str) -> None:
        stream = self._streams.get(job_id)
        if stream is not None:
            await self._show(job_id, stream.fail(notice))

    async def run(self, job_id: int, conversation_id: int) -> AttemptOutcome:
        conversation = await self.repo.get_conversation(conversation_id)
        adapter = self.adapters.get(conversation.platform)
        if adapter is None:
            # Accepted while that platform ran; it waits, queued, until the platform is back.
            log.warning("conversation %d waits: the %s adapter is not running", conversation_id, conversation.platform)
            return AttemptOutcome.PARKED
        job = await self.repo.get_job(job_id)
        trigger = await self.repo.get_message(job.message_id)
        parent, parent_reply = await self._parent_of(job)
        # Only what the context could hold (by a generous characters-a-token bound; the backend
        # trims by tokens), with every reply finished by now after its question.
        info = self.client.model_info
        history = await self.repo.prompt_history(
            conversation_id,
            up_to_message_id=job.message_id,
            max_chars=history_char_budget(info.context_window if info else 0),
            message_chars=MESSAGE_OVERHEAD_CHARS,
        )
        chat = build_chat(conversation, history, self.policy.default_system_prompt)
        # The text the reply starts with, which the model continues (a final assistant message):
        # what an interrupted attempt had shown (crash resume), else the reply Continue extends.
        prefix = job.shown_text or (parent_reply or "" if job.kind == JobKind.CONTINUE.value else "")
        prefix = prefix.lstrip()
        if prefix:
            chat = (*chat, ChatMessage(Role.ASSISTANT.value, prefix))
        settings = effective_settings(conversation, self.policy.default_settings)
        if not await self.repo.mark_running(job_id, [m.to_dict() for m in chat]):
            return AttemptOutcome.NOT_STARTED
        self._claimed.add(job_id)  # released by `ended` (the queue calls it however the attempt ends)
        self._lost.discard(job_id)
        stream = self._streams.get(job_id)
        key = ConversationKey(conversation.platform, conversation.key)
        if stream is None:
            # After a crash, the messages the interrupted attempt posted are edited, not reposted;
            # a Regenerate or Continue shows its reply in the messages of the reply it replaces.
            resume = job.reply_platform_ids or (parent.reply_platform_ids if parent is not None else None) or ()
            stream = await adapter.open_reply(key, trigger.platform_message_id if trigger else None, resume)
            self._streams[job_id] = stream
            if not job.reply_platform_ids:
                await self._retire_controls(adapter, key, job, resume)
        stream.job_id = job_id
        if job.reply_message_id is not None:
            # An attempt stored this reply and died before it was shown in full: show that text.
            stored = await self.repo.get_message(job.reply_message_id)
            if stored is not None and not stored.archived:
                stream.on_posted = self._id_saver(job_id, job.reply_platform_ids)
                return await self._deliver(job_id, stream, stored.text, job.finish_reason, stored=True)
        # Every posted id is saved before the stream sends the next message (it awaits this), and
        # the text shown before it is shown (streams that report renders) or about once a second.
        progress = _Progress(self.repo, job_id, job.shown_text)
        stream.on_posted = persist = self._id_saver(job_id, job.reply_platform_ids, progress)
        stream.on_render = progress.save
        await stream.set_controls([Control.STOP])
        if prefix:
            await stream.update(prefix)
        generated = ""
        result: GenerationResult | None = None
        try:
            async for event in self.client.submit(GenerationRequest(job_id, chat, settings)):
                if isinstance(event, TextDelta):
                    generated += event.text
                    shown = prefix + generated if prefix else generated.lstrip()  # as the final reply will be
                    if shown.strip():
                        await progress.save(shown, throttled=True)
                        await stream.update(shown)
                        await persist(stream.posted_ids)  # for a stream that does not report them
                else:
                    result = event
        except BackendDown as exc:
            if job_id in self._lost:
                return await self.abandon(job_id, "taken over")
            return await self._backend_down(job_id, stream, exc)
        except JobFailed as exc:
            await self.repo.fail_job(job_id, str(exc))
            notice = messages.BACKEND_BUSY if isinstance(exc, BackendBusy) else messages.job_failed(str(exc))
            await stream.set_controls(())
            await self._show(job_id, stream.fail(notice))
            return AttemptOutcome.FAILED
        if job_id in self._lost:
            return await self.abandon(job_id, "taken over")
        text = (prefix + generated).strip()
        if job_id in self._cancelled or (result is not None and result.finish_reason == "cancelled"):
            return await self._stopped(job, stream, text, generated, parent, parent_reply)
        finish_reason = result.finish_reason if result is not None else None
        return await self._deliver(job_id, stream, text or messages.EMPTY_REPLY, finish_reason)

    async def _parent_of(self, job: Job) -> tuple[Job | None, str | None]:
        """A follow-up's parent job and the text of its reply (None when it has none in the history)."""
        if job.parent_job_id is None:
            return None, None
        parent = await self.repo.get_job(job.parent_job_id)
        if parent is None or parent.reply_message_id is None:
            return parent, None
        reply = await self.repo.get_message(parent.reply_message_id)
        return parent, (reply.text if reply is not None and not reply.archived else None)

    async def _retire_controls(self, adapter: Adapter, key: ConversationKey, job: Job, resume: Sequence[str]) -> None:
        """A new reply begins: the one before it in the conversation loses its controls (best
        effort: a message gone or a platform refusing is logged, not fatal)."""
        if not adapter.supports_controls:
            return
        try:
            older = await self.repo.previous_reply_ids(job.conversation_id, job.id, keep=resume)
            if older:
                await adapter.clear_controls(key, older)
        except Exception as exc:  # noqa: BLE001 - a platform's errors are the adapter's types
            log.warning("job %d: could not remove the controls of the previous reply: %s: %s", job.id, type(exc).__name__, exc)

    async def _stopped(
        self, job: Job, stream: ReplyStream, text: str, generated: str, parent: Job | None, parent_reply: str | None
    ) -> AttemptOutcome:
        """The reply was stopped (Stop, /reset, /forget): what was shown is kept and stored as a
        stopped reply, its marker after any code block the text left open. A Regenerate or
        Continue stopped before it added anything gives the reply it follows back, unchanged."""
        job_id = job.id
        if parent is not None and parent_reply is not None and not generated.strip() and not job.shown_text:
            await self.repo.cancel_job(job_id)
            await stream.set_controls(_final_controls(parent.finish_reason))
            await self._show(job_id, stream.finish(parent_reply))
            return AttemptOutcome.CANCELLED
        if not text:
            await self.repo.cancel_job(job_id)
            await stream.set_controls(())
            await self._show(job_id, stream.fail(messages.STOPPED))
            return AttemptOutcome.CANCELLED
        reply = messages.stopped_reply(text)
        stored = await self.repo.store_stopped_reply(
            job_id,
            reply_text=reply,
            author_id="parley",
            author_name=self.policy.bot_name,
            platform_message_id=stream.posted_ids[0] if stream.posted_ids else None,
        )
        # Not stored when its question left the history (/reset, /forget): nothing to regenerate.
        await stream.set_controls(() if stored is None else [Control.REGENERATE])
        await self._show(job_id, stream.finish(reply))
        return AttemptOutcome.CANCELLED

    async def _backend_down(self, job_id: int, stream: ReplyStream, exc: BackendDown) -> AttemptOutcome:
        attempts = await self.repo.requeue_job(job_id, f"backend down: {exc}")
        limit = self.policy.max_attempts
        if attempts >= limit:
            log.error("job %d: the backend went down %d times while answering it; giving up", job_id, attempts)
            await self.repo.fail_job(job_id, f"backend down {attempts} times")
            await self._show(job_id, stream.fail(messages.backend_gave_up(attempts)))
            return AttemptOutcome.FAILED
        log.warning("job %d: the backend went down (attempt %d of %d); it will be retried", job_id, attempts, limit)
        return AttemptOutcome.REQUEUED

    async def _deliver(
        self, job_id: int, stream: ReplyStream, reply: str, finish_reason: str | None, *, stored: bool = False
    ) -> AttemptOutcome:
        """Store the final reply, show it, then end the job. Stored first, so no trouble delivering
        it can lose it (the stream retries, then posts anew); ended last, so a crash in between
        leaves the job running with its reply stored, and the restarted attempt shows that very
        text (`stored=True`) instead of generating anew. The job fails only when nothing of it
        could be shown, and the text is kept (archived) even then."""
        if not stored:
            await self.repo.finish_job(
                job_id,
                reply_text=reply,
                author_id="parley",
                author_name=self.policy.bot_name,
                platform_message_id=stream.posted_ids[0] if stream.posted_ids else None,
                done=False,
                finish_reason=finish_reason,
            )
        await stream.set_controls(_final_controls(finish_reason))
        error = await self._show(job_id, stream.finish(reply))
        shown = error is None or bool(stream.posted_ids)  # a terminal shows without message ids
        ended = await self.repo.complete_job(
            job_id,
            shown=shown,
            platform_message_id=stream.posted_ids[0] if stream.posted_ids else None,
            error="" if shown else f"the reply could not be shown: {type(error).__name__}: {error}",
        )
        if not ended:  # cancelled while it was being shown: its reply is archived
            return AttemptOutcome.CANCELLED
        return AttemptOutcome.DONE if shown else AttemptOutcome.FAILED

    @staticmethod
    async def _show(job_id: int, delivery: Awaitable[object]) -> Exception | None:
        """Await a reply stream's finish or fail; the platform's refusal (after the stream's own
        retries) is logged and returned, not raised: what was generated is stored regardless."""
        try:
            await delivery
        except Exception as exc:  # noqa: BLE001 - a platform's errors are the adapter's types
            log.warning("job %d: the reply could not be shown in full: %s: %s", job_id, type(exc).__name__, exc)
            return exc
        return None

    def _id_saver(
        self, job_id: int, saved: Sequence[str] | None, progress: _Progress | None = None
    ) -> Callable[[list[str]], Awaitable[None]]:
        """Saves a reply's posted ids when they change, one save at a time, in call order (and
        the text shown so far with them)."""
        last = list(saved or ())
        lock = asyncio.Lock()

        async def persist(ids: list[str]) -> None:
            nonlocal last
            async with lock:
                if list(ids) != last:
                    await self.repo.set_reply_platform_ids(job_id, ids)
                    last = list(ids)
                    if progress is not None:
                        await progress.flush()

        return persist


def _final_controls(finish_reason: str | None) -> tuple[Control, ...]:
    """A finished reply's controls: Regenerate, and Continue when it was cut at the length limit.
    (The stored text stays the model's own; adapters may show `messages.CUT_AT_LENGTH` beside
    Continue.)"""
    return (Control.REGENERATE, Control.CONTINUE) if finish_reason == "length" else (Control.REGENERATE,)


class _Progress:
    """The text a streaming reply has shown, persisted on the job (`shown_text`) so an attempt
    after a crash goes on from it: before each render a stream reports (`on_render`), else at most
    once every `interval` seconds, and whenever posted ids are saved."""

    def __init__(self, repo: Repository, job_id: int, saved: str | None, interval: float = 1.0) -> None:
        self.repo = repo
        self.job_id = job_id
        self.interval = interval
        self._saved = saved or ""
        self._latest = self._saved
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def save(self, text: str, *, throttled: bool = False) -> None:
        self._latest = text
        if throttled and time.monotonic() - self._at < self.interval:
            return
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            text = self._latest
            if text and text != self._saved:
                await self.repo.set_shown_text(self.job_id, text)
                self._saved = text
                self._at = time.monotonic()

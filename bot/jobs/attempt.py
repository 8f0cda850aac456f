"""One attempt at a job, from the stored conversation to the stored reply.

Builds the chat from the history, marks the job running (storing the prompt), opens (or, after a
crash, resumes) the adapter's reply stream, streams the backend's deltas into it while persisting
each posted message id, and stores the outcome: done, failed, cancelled, or queued again when the
backend went down while holding it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.conversation.history import build_chat, effective_settings
from bot.core.contracts import Adapter, ReplyStream
from bot.core.errors import BackendDown, JobFailed
from bot.core.types import ConversationKey, GenerationSettings, JobStatus
from bot.generation.client import GenerationClient, GenerationRequest, GenerationResult, TextDelta

if TYPE_CHECKING:
    from storage import Repository

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
    """The job was no longer queued when the attempt began (cancelled in between)."""

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

    def cancelled(self, job_id: int) -> None:
        """The job was cancelled while running; its attempt stores it as cancelled."""
        self._cancelled.add(job_id)

    def forget(self, job_id: int) -> None:
        """The job reached a final state; drop what was kept for its retries."""
        self._streams.pop(job_id, None)
        self._cancelled.discard(job_id)

    async def notify_failure(self, job_id: int, notice: str) -> None:
        stream = self._streams.get(job_id)
        if stream is not None:
            try:
                await stream.fail(notice)
            except Exception:
                log.exception("could not tell the user that job %d failed", job_id)

    async def run(self, job_id: int, conversation_id: int) -> AttemptOutcome:
        conversation = await self.repo.get_conversation(conversation_id)
        adapter = self.adapters.get(conversation.platform)
        if adapter is None:
            # Accepted while that platform ran; it waits, queued, until the platform is back.
            log.warning("conversation %d waits: the %s adapter is not running", conversation_id, conversation.platform)
            return AttemptOutcome.PARKED
        job = await self.repo.get_job(job_id)
        trigger = await self.repo.get_message(job.message_id)
        history = await self.repo.history(conversation_id, up_to_message_id=job.message_id)
        chat = build_chat(conversation, history, self.policy.default_system_prompt)
        settings = effective_settings(conversation, self.policy.default_settings)
        if not await self.repo.mark_running(job_id, [m.to_dict() for m in chat]):
            return AttemptOutcome.NOT_STARTED
        stream = self._streams.get(job_id)
        if stream is None:
            # After a crash, the messages the interrupted attempt posted are edited, not reposted.
            resume = job.reply_platform_ids or ()
            key = ConversationKey(conversation.platform, conversation.key)
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
            return await self._backend_down(job_id, stream, exc)
        except JobFailed as exc:
            await self.repo.fail_job(job_id, str(exc))
            await stream.fail(messages.job_failed(str(exc)))
            return AttemptOutcome.FAILED
        if job_id in self._cancelled or (result is not None and result.finish_reason == "cancelled"):
            await self.repo.cancel_job(job_id)
            if text.strip():
                await stream.finish(f"{text}\n{messages.STOPPED}")
            else:
                await stream.fail(messages.STOPPED)
            return AttemptOutcome.CANCELLED
        reply = text.strip() or messages.EMPTY_REPLY
        platform_ids = await stream.finish(reply)
        await self.repo.finish_job(
            job_id,
            reply_text=reply,
            author_id="parley",
            author_name=self.policy.bot_name,
            platform_message_id=platform_ids[0] if platform_ids else None,
        )
        return AttemptOutcome.DONE

    async def _backend_down(self, job_id: int, stream: ReplyStream, exc: BackendDown) -> AttemptOutcome:
        attempts = await self.repo.requeue_job(job_id, f"backend down: {exc}")
        limit = self.policy.max_attempts
        if attempts >= limit:
            log.error("job %d: the backend went down %d times while answering it; giving up", job_id, attempts)
            await self.repo.fail_job(job_id, f"backend down {attempts} times")
            await stream.fail(messages.backend_gave_up(attempts))
            return AttemptOutcome.FAILED
        log.warning("job %d: the backend went down (attempt %d of %d); it will be retried", job_id, attempts, limit)
        return AttemptOutcome.REQUEUED

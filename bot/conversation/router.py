"""The router: what to do with one incoming message.

A command goes to the command registry (which checks permissions and runs it); a message the
bot should answer is recorded and queued; any other message is only recorded as context.
Outcomes are values (`RouteResult`); their sentences come from `bot.conversation.messages`.

Every update takes effect once. Messages are recorded once by their platform id; a command's
change, its audit row and the record that its update was handled are one transaction (storage
claims the update `Repository.handling` names), and read-only commands and refusals record
theirs too, so a command delivered again does nothing and says nothing (`Outcome.DUPLICATE`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.conversation.commands import COMMANDS, MAX_COMMAND_CHARS
from bot.conversation.context import CommandContext, ConversationDefaults, HealthPort, JobsPort
from bot.conversation.limits import UserRateLimit
from bot.conversation.registry import CommandRegistry, ParsedCommand, parse_command
from bot.core.contracts import Control, ControlPress, Outcome, Refusal, RefusalKind, RouteResult
from bot.core.errors import ParleyError, QueueFull, StorageError, StorageUnavailable, UpdateAlreadyHandled
from bot.core.text import normalize_text
from bot.core.types import ConversationKey, GenerationSettings, IncomingMessage, JobKind, JobStatus, Role

if TYPE_CHECKING:
    from storage import Conversation, Repository

    from bot.core.config import BotSettings, QueueSettings

__all__ = ["Router"]

log = logging.getLogger("parley.router")


def _press_update(press: ControlPress) -> IncomingMessage | None:
    """The update a press came in, as storage records handled updates (by conversation and an id
    that cannot be a message's: "press:<platform>:<press id>"); None for presses that cannot come
    twice (no id)."""
    if not press.press_id:
        return None
    platform = press.conversation.platform
    return IncomingMessage(
        conversation=press.conversation,
        message_id=f"press:{platform}:{press.press_id}",
        author=press.author,
        text="",
        is_direct=press.is_direct,
        addressed=False,
    )


def _refused(outcome: Outcome, refusal: Refusal) -> RouteResult:
    return RouteResult(outcome, reply=messages.render_refusal(refusal), refusal=refusal, private=True)


class Router:
    """Platform-free core entry point (the `Core` adapters call); `handle` takes every incoming message.

    It needs storage, the job queue (`JobsPort`), the backend's health (`HealthPort`), the `[bot]`
    and `[queue]` settings and the default generation settings; `rate_limit` and `commands` may be
    replaced (tests).
    """

    def __init__(
        self,
        repo: Repository,
        jobs: JobsPort,
        backend: HealthPort,
        *,
        bot: BotSettings,
        queue_limits: QueueSettings,
        generation: GenerationSettings,
        rate_limit: UserRateLimit | None = None,
        commands: CommandRegistry = COMMANDS,
    ) -> None:
        self.repo = repo
        self.jobs = jobs
        self.backend = backend
        self.max_input_chars = bot.max_input_chars
        self.defaults = ConversationDefaults(bot_name=bot.name, system_prompt=bot.system_prompt, generation=generation)
        self.rate_limit = rate_limit or UserRateLimit(queue_limits.user_messages_per_minute)
        self.commands = commands
        self._bot_usernames: dict[str, str] = {}
        self._storage_down = False

    def set_bot_username(self, platform: str, username: str) -> None:
        """So `/cmd@thisbot` is ours and `/cmd@otherbot` is not."""
        self._bot_usernames[platform] = username

    async def handle(self, message: IncomingMessage) -> RouteResult:
        """What to do with `message`. When storage is unavailable nothing is recorded and the
        author is asked to send it again (adapters that can have the update delivered again call
        `handle_update` instead)."""
        try:
            result = await self.handle_update(message)
        except StorageUnavailable as exc:
            if not self._storage_down:
                self._storage_down = True
                log.warning("storage is unavailable, messages are refused until it is back: %s", exc)
            return RouteResult(Outcome.ERROR, reply=messages.STORAGE_UNAVAILABLE, private=True)
        if self._storage_down:
            self._storage_down = False
            log.info("storage is available again")
        return result

    async def handle_update(self, message: IncomingMessage) -> RouteResult:
        """`handle` for adapters that can have an update delivered again (Telegram): when storage
        is unavailable this raises `StorageUnavailable` having recorded nothing, and the adapter
        leaves the update unconfirmed and tries it again later."""
        try:
            return await self._handle(message)
        except StorageUnavailable:
            raise
        except UpdateAlreadyHandled:
            return RouteResult(Outcome.DUPLICATE)
        except StorageError:
            log.exception("storage failed on message %s in %s", message.message_id, message.conversation)
            return RouteResult(Outcome.ERROR, reply=messages.UNEXPECTED_ERROR, private=True)
        except ParleyError as exc:
            log.warning("could not handle message %s in %s: %s", message.message_id, message.conversation, exc)
            return RouteResult(Outcome.ERROR, reply=messages.could_not_handle(str(exc)), private=True)
        except Exception:
            # The core's one error hook: log with the traceback, tell the user something short.
            log.exception("unexpected error handling message %s in %s", message.message_id, message.conversation)
            return RouteResult(Outcome.ERROR, reply=messages.UNEXPECTED_ERROR, private=True)

    async def _handle(self, message: IncomingMessage) -> RouteResult:
        if message.author.is_bot:
            return RouteResult(Outcome.IGNORED)
        text = normalize_text(message.text)
        limit = self.max_input_chars
        if text.startswith("/"):
            command = parse_command(text, self._bot_usernames.get(message.conversation.platform))
            if command is None:
                return RouteResult(Outcome.IGNORED)
            return await self._command(message, text, command)
        if not text:
            return RouteResult(Outcome.IGNORED)
        if message.addressed and len(text) > limit:
            refusal = Refusal(RefusalKind.TOO_LONG, count=len(text), maximum=limit)
            return await self._refuse_once(message, Outcome.REFUSED, refusal)
        conversation = await self._conversation_for(message)
        if not message.addressed:
            await self.repo.record_message(
                conversation.id,
                role=Role.USER.value,
                author_id=message.author.id,
                author_name=message.author.name,
                text=text[:limit],
                platform_message_id=message.message_id,
                reply_to=message.reply_to,
                created_at=message.sent_at,
            )
            return RouteResult(Outcome.RECORDED)
        if await self.repo.was_handled(message):  # refused before, then delivered again
            return RouteResult(Outcome.DUPLICATE)
        wait = self.rate_limit.check(message.conversation.platform, message.author.id)
        if wait is not None:
            return await self._refuse_once(message, Outcome.BUSY, Refusal(RefusalKind.RATE_LIMITED, seconds=wait))
        try:
            job, created = await self.jobs.enqueue(conversation.id, message, text)
        except QueueFull as exc:
            refusal = Refusal(RefusalKind.QUEUE_FULL, limit=exc.limit, count=exc.count, maximum=exc.maximum)
            return _refused(Outcome.BUSY, refusal)
        if not created:
            return RouteResult(Outcome.DUPLICATE, job_id=job.id if job else None)
        return RouteResult(Outcome.QUEUED, job_id=job.id if job else None)

    async def _command(self, message: IncomingMessage, text: str, command: ParsedCommand) -> RouteResult:
        if await self.repo.was_handled(message):
            return RouteResult(Outcome.DUPLICATE)
        if len(text) > max(self.max_input_chars, MAX_COMMAND_CHARS):
            refusal = Refusal(RefusalKind.TOO_LONG, count=len(text), command=command.name)
            return await self._refuse_once(message, Outcome.REFUSED, refusal)
        wait = self.rate_limit.check(message.conversation.platform, message.author.id)
        if wait is not None:
            return await self._refuse_once(message, Outcome.BUSY, Refusal(RefusalKind.RATE_LIMITED, seconds=wait))
        with self.repo.handling(message) as claim:
            result = await self.commands.run(self.command_context(message), command)
        # A change claimed the update in its own transaction; anything else (reading, refusing,
        # a usage answer) records it now, and answers only if it was the first to.
        if not claim.claimed and not await self.repo.mark_handled(message):
            return RouteResult(Outcome.DUPLICATE)
        return result

    async def _refuse_once(self, message: IncomingMessage, outcome: Outcome, refusal: Refusal) -> RouteResult:
        if not await self.repo.mark_handled(message):
            return RouteResult(Outcome.DUPLICATE)
        return _refused(outcome, refusal)

    async def claim_update(self, message: IncomingMessage) -> bool:
        """For what an adapter answers by itself (a welcome, "text only"): record that the update
        carrying `message` was handled; False when it had been (say nothing then). Raises
        `StorageUnavailable` like `handle_update`."""
        return await self.repo.mark_handled(message)

    def command_context(self, message: IncomingMessage) -> CommandContext:
        """What a command run for `message` may use."""
        return CommandContext(
            message=message, defaults=self.defaults, repo=self.repo, jobs=self.jobs, health=self.backend.health
        )

    async def press(self, press: ControlPress) -> RouteResult:
        """A control pressed on a reply (see `Core.press`). It takes effect once: the press's
        platform id is recorded in `handled_updates` (as "press:<platform>:<id>") in the same
        transaction as its effect, a Regenerate or Continue already waiting for the same reply
        makes a second one a duplicate, and Stop on a stopped reply has expired."""
        try:
            return await self._press(press)
        except UpdateAlreadyHandled:
            return RouteResult(Outcome.DUPLICATE)
        except StorageUnavailable as exc:
            log.warning("storage is unavailable; a %s press was not taken: %s", press.control.value, exc)
            return RouteResult(Outcome.ERROR, reply=messages.STORAGE_UNAVAILABLE, private=True)
        except StorageError:
            log.exception("storage failed on a %s press on job %d", press.control.value, press.job_id)
            return RouteResult(Outcome.ERROR, reply=messages.UNEXPECTED_ERROR, private=True)
        except Exception:
            log.exception("unexpected error handling a %s press on job %d", press.control.value, press.job_id)
            return RouteResult(Outcome.ERROR, reply=messages.UNEXPECTED_ERROR, private=True)

    async def _press(self, press: ControlPress) -> RouteResult:
        update = _press_update(press)
        if update is not None and await self.repo.was_handled(update):
            return RouteResult(Outcome.DUPLICATE)

        async def refuse(kind: RefusalKind, outcome: Outcome = Outcome.REFUSED) -> RouteResult:
            if update is not None and not await self.repo.mark_handled(update):
                return RouteResult(Outcome.DUPLICATE)
            return _refused(outcome, Refusal(kind))

        conversation = await self.repo.find_conversation(press.conversation)
        job = await self.repo.get_job(press.job_id)
        if conversation is None or job is None or job.conversation_id != conversation.id:
            return await refuse(RefusalKind.CONTROL_EXPIRED)
        trigger = await self.repo.get_message(job.message_id)
        if trigger is None or trigger.archived:  # a /reset (or /forget) since
            return await refuse(RefusalKind.CONVERSATION_RESET)
        author = press.author
        if not (press.is_direct or conversation.is_direct or author.is_admin or trigger.author_id == author.id):
            return await refuse(RefusalKind.NOT_YOURS)
        claim = self.repo.handling(update) if update is not None else contextlib.nullcontext()
        if press.control is Control.STOP:
            with claim:
                stopped = await self.jobs.stop_reply(job.id)
            if not stopped:
                return await refuse(RefusalKind.CONTROL_EXPIRED)
            return RouteResult(Outcome.COMMAND, reply=messages.STOPPING, job_id=job.id, private=True)
        waiting = await self.repo.pending_followup(job.id)
        if waiting is not None:  # a double tap (two presses, two platform ids): it runs once
            if update is not None:
                await self.repo.mark_handled(update)
            return RouteResult(Outcome.DUPLICATE, job_id=waiting.id)
        finished = job.status in (JobStatus.DONE, JobStatus.CANCELLED)
        if not finished or await self.repo.newest_reply_job(conversation.id) != job.id:
            return await refuse(RefusalKind.CONTROL_EXPIRED)
        if press.control is Control.CONTINUE and (job.status != JobStatus.DONE or job.finish_reason != "length"):
            return await refuse(RefusalKind.CONTROL_EXPIRED)
        wait = self.rate_limit.check(press.conversation.platform, author.id)
        if wait is not None:
            return await refuse(RefusalKind.RATE_LIMITED, Outcome.BUSY)
        kind = JobKind.CONTINUE if press.control is Control.CONTINUE else JobKind.REGENERATE
        try:
            with claim:
                followup, created = await self.jobs.enqueue_followup(job.id, kind)
        except QueueFull as exc:
            refusal = Refusal(RefusalKind.QUEUE_FULL, limit=exc.limit, count=exc.count, maximum=exc.maximum)
            return _refused(Outcome.BUSY, refusal)
        if not created:  # another press got there first, between the check above and now
            return RouteResult(Outcome.DUPLICATE, job_id=followup.id)
        reply = messages.CONTINUING if kind is JobKind.CONTINUE else messages.REGENERATING
        return RouteResult(Outcome.QUEUED, reply=reply, job_id=followup.id, private=True)

    async def handle_edit(self, message: IncomingMessage) -> bool:
        """A user edited a message: the stored text follows (the answer already given stays).

        The edit passes the rules a new message does: normalized, and ignored (the stored text
        stays) when nothing is left or it is over `max_input_chars`."""
        text = normalize_text(message.text)
        if not text or message.author.is_bot or len(text) > self.max_input_chars:
            return False
        conversation = await self.repo.find_conversation(message.conversation)
        return conversation is not None and await self.repo.update_message_text(conversation.id, message.message_id, text)

    async def handle_delete(self, conversation: ConversationKey, message_id: str) -> bool:
        """A user deleted a message: it leaves the history the model sees."""
        stored = await self.repo.find_conversation(conversation)
        return stored is not None and await self.repo.archive_message(stored.id, message_id)

    async def wait_for(self, job_id: int) -> str:
        """Wait until a job is done, failed or cancelled; returns that status."""
        return await self.jobs.wait_for(job_id)

    async def _conversation_for(self, message: IncomingMessage) -> Conversation:
        return await self.repo.get_or_create_conversation(message.conversation, is_direct=message.is_direct)

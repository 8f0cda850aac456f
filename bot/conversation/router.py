"""The router: what to do with one incoming message.

A command goes to the command registry (which checks permissions and runs it); a message the
bot should answer is recorded and queued; any other message is only recorded as context.
Outcomes are values (`RouteResult`); their sentences come from `bot.conversation.messages`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.conversation.commands import COMMANDS, MAX_COMMAND_CHARS
from bot.conversation.context import CommandContext, ConversationDefaults, HealthPort, JobsPort
from bot.conversation.limits import UserRateLimit
from bot.conversation.registry import CommandRegistry, parse_command
from bot.core.contracts import Outcome, Refusal, RefusalKind, RouteResult
from bot.core.errors import ParleyError, QueueFull
from bot.core.text import normalize_text
from bot.core.types import ConversationKey, GenerationSettings, IncomingMessage, Role

if TYPE_CHECKING:
    from storage import Conversation, Repository

    from bot.core.config import BotSettings, QueueSettings

__all__ = ["Router"]

log = logging.getLogger("parley.router")


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

    def set_bot_username(self, platform: str, username: str) -> None:
        """So `/cmd@thisbot` is ours and `/cmd@otherbot` is not."""
        self._bot_usernames[platform] = username

    async def handle(self, message: IncomingMessage) -> RouteResult:
        try:
            return await self._handle(message)
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
            if len(text) > max(limit, MAX_COMMAND_CHARS):
                return _refused(Outcome.REFUSED, Refusal(RefusalKind.TOO_LONG, count=len(text), command=command.name))
            return await self.commands.run(self.command_context(message), command)
        if not text:
            return RouteResult(Outcome.IGNORED)
        if message.addressed and len(text) > limit:
            return _refused(Outcome.REFUSED, Refusal(RefusalKind.TOO_LONG, count=len(text), maximum=limit))
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
        wait = self.rate_limit.check(message.conversation.platform, message.author.id)
        if wait is not None:
            return _refused(Outcome.BUSY, Refusal(RefusalKind.RATE_LIMITED, seconds=wait))
        try:
            job, created = await self.jobs.enqueue(conversation.id, message, text)
        except QueueFull as exc:
            refusal = Refusal(RefusalKind.QUEUE_FULL, limit=exc.limit, count=exc.count, maximum=exc.maximum)
            return _refused(Outcome.BUSY, refusal)
        if not created:
            return RouteResult(Outcome.DUPLICATE, job_id=job.id if job else None)
        return RouteResult(Outcome.QUEUED, job_id=job.id if job else None)

    def command_context(self, message: IncomingMessage) -> CommandContext:
        """What a command run for `message` may use."""
        return CommandContext(
            message=message, defaults=self.defaults, repo=self.repo, jobs=self.jobs, health=self.backend.health
        )

    async def handle_edit(self, message: IncomingMessage) -> bool:
        """A user edited a message: the stored text follows (the answer already given stays)."""
        text = message.text.strip()
        if not text or message.author.is_bot:
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

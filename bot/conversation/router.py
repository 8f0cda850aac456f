"""The router: what to do with one incoming message.

A command is run (with its permission check) and answered through the adapter; a message the
bot should answer is recorded and queued; any other message is only recorded as context.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict, deque
from typing import TYPE_CHECKING

from bot.conversation.commands import ADMIN_COMMANDS, MAX_COMMAND_CHARS, parse_command, run_command
from bot.conversation import messages
from bot.core.contracts import Outcome, Refusal, RefusalKind, RouteResult
from bot.core.errors import ParleyError, QueueFull
from bot.core.text import normalize_text
from bot.core.types import ConversationKey, IncomingMessage, Role

if TYPE_CHECKING:
    from storage import Repository

    from bot.core.config import Settings
    from bot.generation.client import GenerationClient
    from bot.jobs.queue import GenerationQueue

__all__ = ["Router", "RouteResult"]

log = logging.getLogger("parley.router")

RATE_WINDOW = 60.0


def _refused(outcome: Outcome, refusal: Refusal) -> RouteResult:
    return RouteResult(outcome, reply=messages.render_refusal(refusal), refusal=refusal, private=True)


class Router:
    """Platform-free core entry point; adapters call `handle` for every incoming message."""

    def __init__(self, settings: Settings, repo: Repository, queue: GenerationQueue, client: GenerationClient) -> None:
        self.settings = settings
        self.repo = repo
        self.queue = queue
        self.client = client
        self._bot_usernames: dict[str, str] = {}
        self._recent: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)

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
        limit = self.settings.bot.max_input_chars
        if text.startswith("/"):
            command = parse_command(text, self._bot_usernames.get(message.conversation.platform))
            if command is None:
                return RouteResult(Outcome.IGNORED)
            if len(text) > max(limit, MAX_COMMAND_CHARS):
                return _refused(Outcome.REFUSED, Refusal(RefusalKind.TOO_LONG, count=len(text), command=command.name))
            reply = await run_command(self, message, command)
            # Transitional: the command registry will return the refusal as a value.
            return RouteResult(Outcome.COMMAND, reply=reply, private=reply.startswith("Only admins"))
        if not text:
            return RouteResult(Outcome.IGNORED)
        if message.addressed and len(text) > limit:
            return _refused(Outcome.REFUSED, Refusal(RefusalKind.TOO_LONG, count=len(text), maximum=limit))
        conversation = await self.conversation_for(message)
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
        wait = self._rate_limited(message)
        if wait is not None:
            return _refused(Outcome.BUSY, Refusal(RefusalKind.RATE_LIMITED, seconds=wait))
        try:
            job, created = await self.queue.enqueue(conversation.id, message, text)
        except QueueFull as exc:
            refusal = Refusal(RefusalKind.QUEUE_FULL, limit=exc.limit, count=exc.count, maximum=exc.maximum)
            return _refused(Outcome.BUSY, refusal)
        if not created:
            return RouteResult(Outcome.DUPLICATE, job_id=job.id if job else None)
        return RouteResult(Outcome.QUEUED, job_id=job.id if job else None)

    def _rate_limited(self, message: IncomingMessage) -> int | None:
        """Seconds until this user may send again, or None. A sliding one-minute window per user."""
        now = time.monotonic()
        recent = self._recent[(message.conversation.platform, message.author.id)]
        while recent and now - recent[0] > RATE_WINDOW:
            recent.popleft()
        if len(recent) >= self.settings.queue.user_messages_per_minute:
            return max(1, math.ceil(RATE_WINDOW - (now - recent[0])))
        recent.append(now)
        return None

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
        return await self.queue.wait_for(job_id)

    async def conversation_for(self, message: IncomingMessage):  # noqa: ANN201 - storage's Conversation
        return await self.repo.get_or_create_conversation(message.conversation, is_direct=message.is_direct)

    def may_administer(self, message: IncomingMessage) -> bool:
        """DESIGN's rule: in a direct chat the user is the admin of their own conversation; in a
        shared one only the people the adapter marked as admins."""
        return message.is_direct or message.author.is_admin

    def refusal(self, command: str) -> str:
        assert command in ADMIN_COMMANDS
        return messages.render_refusal(Refusal(RefusalKind.NOT_ADMIN, command=command))

    async def audit(self, message: IncomingMessage, conversation_id: int, action: str, detail: str) -> None:
        await self.repo.audit(
            conversation_id,
            platform=message.conversation.platform,
            actor_id=message.author.id,
            actor_name=message.author.name,
            action=action,
            detail=detail,
        )

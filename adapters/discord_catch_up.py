"""Discord's catch-up: Discord does not redeliver what was sent while the bot was away, so after a
fresh gateway session (a start, or a session that could not resume) the adapter reads back the
recent history of the channels and DMs it has conversations in (`[discord] catch_up_minutes`).
`DiscordAdapter` inherits `DiscordCatchUp`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Optional

import discord

from bot.core.contracts import Outcome

from .base import Core

if TYPE_CHECKING:
    from bot.core.config import DiscordSettings

log = logging.getLogger("parley.discord")

CATCH_UP_LIMIT = 100
"""The most messages read back per channel when catching up (the newest ones)."""
CATCH_UP_OVERLAP = timedelta(minutes=1)
"""Read back from this long before the newest message a conversation recorded: one being
recorded when the bot stopped, and clocks that disagree, are covered (recording is idempotent)."""


class DiscordCatchUp:
    """The catch-up half of `DiscordAdapter` (which provides the attributes declared here)."""

    config: DiscordSettings
    core: Optional[Core]
    client: Optional[discord.Client]
    platform: str
    catch_up_runs: int
    caught_up: asyncio.Event
    _catching_up: Optional[asyncio.Task]

    def channel_lock(self, channel_id: int) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def _in_background(self, work: Coroutine[Any, Any, Any], name: Optional[str] = None) -> asyncio.Task:
        raise NotImplementedError

    async def _channel(self, channel_id: int) -> discord.abc.Messageable:
        raise NotImplementedError

    async def _on_message(self, message: discord.Message, *, may_answer: bool = True) -> Optional[Outcome]:
        raise NotImplementedError

    def _catch_up_soon(self) -> None:
        """Read back, in the background, what this fresh gateway session was not sent (after any
        catch-up still running)."""
        self.catch_up_runs += 1
        self.caught_up.clear()
        self._catching_up = self._in_background(self._catch_up(self._catching_up), "parley-discord-catch-up")

    async def _catch_up(self, previous: Optional[asyncio.Task]) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            if self.config.catch_up_minutes > 0 and self.core is not None:
                await self._read_back(self.core)
        except Exception:
            log.exception("Discord: could not catch up on the messages sent while it was away")
        finally:
            if self._catching_up is asyncio.current_task():
                self.caught_up.set()

    async def _read_back(self, core: Core) -> None:
        """Every channel and DM with a conversation: messages the bot never saw are handled as if
        just sent, except that those older than `catch_up_minutes` are kept as context only."""
        fresh_since = discord.utils.utcnow() - timedelta(minutes=self.config.catch_up_minutes)
        answered = 0
        for known in await core.conversations_on(self.platform):
            if not known.key.key.isdigit():
                continue
            try:
                answered += await self._read_back_channel(int(known.key.key), known.last_message_at, fresh_since)
            except discord.HTTPException as exc:  # deleted, or no longer readable
                log.info("Discord: could not read back channel %s: %s", known.key.key, exc)
        if answered:
            log.info("Discord: answering %d message(s) sent while it was away", answered)

    async def _read_back_channel(self, channel_id: int, last_seen: Optional[datetime], fresh_since: datetime) -> int:
        assert self.client is not None and self.client.user is not None
        me = self.client.user.id
        channel = await self._channel(channel_id)
        since = last_seen - CATCH_UP_OVERLAP if last_seen is not None else fresh_since
        history = [m async for m in channel.history(limit=CATCH_UP_LIMIT, after=since, oldest_first=False)]  # type: ignore[attr-defined]
        # What the bot already replied to (an answer, a refusal, a command's answer) is done with.
        replied = {m.reference.message_id for m in history if m.author.id == me and m.reference is not None}
        answered = 0
        async with self.channel_lock(channel_id):
            for message in reversed(history):  # oldest first, as they were sent
                if message.id in replied:
                    continue
                outcome = await self._on_message(message, may_answer=message.created_at >= fresh_since)
                answered += outcome is Outcome.QUEUED
        return answered

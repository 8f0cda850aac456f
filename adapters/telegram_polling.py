"""Telegram's long-polling loop, Parley's own in place of PTB's `Updater`: `_PollingMixin`, which
`TelegramAdapter` inherits.

getUpdates is sent the lowest update id still in hand as its offset, so Telegram is told only of
updates that are handled (or deliberately refused). Each chat's updates go to a lane (`_Lane`) and
are handled in order by that chat's own worker; while storage is unavailable the worker keeps its
update unconfirmed and tries it again with a growing pause.

A text past Telegram's 4,096 characters reaches the bot as several messages, cut by the client and
sent back to back. A lane whose next update is a message at the limit waits up to `JOIN_WAIT` for
the one after it; parts from the same author, in the same chat and topic, sent within `JOIN_GAP`
of each other, are handed over together and joined into one question. Only that chat waits.

The state (`_in_hand`, `_done_above`, `_highest`, `_chats`, ...) lives on the adapter object, set up
by `TelegramAdapter.__init__`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from telegram import Update
from telegram.error import InvalidToken, NetworkError, TelegramError

from bot.core.errors import StorageUnavailable

if TYPE_CHECKING:
    from telegram.ext import Application

    from bot.core.config import TelegramSettings

log = logging.getLogger("parley.telegram")

POLL_TIMEOUT = 25  # seconds a getUpdates long poll may wait for news
REPOLL_AFTER = 0.5  # seconds between polls while updates are in hand and none was finished
STORAGE_RETRY_FIRST, STORAGE_RETRY_MAX = 0.25, 15.0  # seconds before trying an update again
SPLIT_AT = 4000
"""A message this long (UTF-16 code units, as Telegram counts; the limit is 4,096) may be the first
part of a text the client split: clients cut at a space or line break near the limit."""
MAX_LENGTH = 4096
JOIN_WAIT = 1.0  # seconds a lane waits for the next part after a message at the limit
JOIN_GAP = 2  # seconds (Telegram dates are whole seconds) between the dates of two parts
MAX_PARTS = 16
ALLOWED_UPDATES = [Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY]  # presses of reply buttons too


def _text_length(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def join_split_text(texts: list[str]) -> str:
    """The parts of a split text as one: a part cut at the limit itself (mid-word) is followed
    directly; one cut at a space or line break, which the client dropped, by a space."""
    joined = texts[0]
    for previous, part in zip(texts, texts[1:]):
        seamless = _text_length(previous) >= MAX_LENGTH or previous[-1:].isspace() or part[:1].isspace()
        joined += part if seamless else " " + part
    return joined


def _may_continue(update: Update) -> bool:
    """A new text message at the length limit: a client may have split a longer text there."""
    message = update.message
    return message is not None and message.from_user is not None and _text_length(message.text or "") >= SPLIT_AT


def _continues(previous: Update, update: Update) -> bool:
    """`update` is the next part of the text `previous` began: a new text message by the same
    author (and on behalf of the same chat), in the same topic, sent right after it."""
    before, message = previous.message, update.message
    if message is None or not message.text or message.from_user is None or before is None:
        return False
    def on_behalf_of(m):  # noqa: ANN001, ANN202 - an anonymous admin's group, a channel, or nobody
        return m.sender_chat.id if m.sender_chat else None

    return (
        message.from_user.id == before.from_user.id
        and on_behalf_of(message) == on_behalf_of(before)
        and message.message_thread_id == before.message_thread_id
        and abs((message.date - before.date).total_seconds()) <= JOIN_GAP
    )


class _Lane:
    """One chat: its updates, handled in order by `worker`, and its notices, sent by `sender`."""

    __slots__ = ("updates", "arrived", "worker", "notices", "sender")

    def __init__(self) -> None:
        self.updates: deque[Update] = deque()
        self.arrived = asyncio.Event()  # set when an update joins `updates`
        self.worker: asyncio.Task | None = None
        self.notices: deque[tuple[int | None, str, int | None]] = deque()
        self.sender: asyncio.Task | None = None

    @property
    def idle(self) -> bool:
        return self.worker is None and self.sender is None and not self.updates and not self.notices


class _PollingMixin:
    """Receiving: getUpdates, the offset, and the per-chat workers that handle updates in order."""

    config: TelegramSettings
    application: Application | None
    username: str
    _poll_failures: int
    _chats: dict[int, _Lane]
    _in_hand: set[int]
    _done_above: set[int]
    _highest: int
    _progress: asyncio.Event
    _storage_down: bool
    _waiting_on_storage: set[int]

    async def _poll(self) -> None:
        """Long-poll getUpdates; hand each new update to its chat's worker. The offset sent is the
        lowest update still in hand, so Telegram is told only of updates that are handled."""
        log.info("Telegram: polling as @%s", self.username)
        self._poll_failures = 0
        while self.application is not None:
            offset = self._offset()
            try:
                updates = await self.application.bot.get_updates(
                    offset=offset, timeout=POLL_TIMEOUT, allowed_updates=ALLOWED_UPDATES
                )
            except InvalidToken:
                log.error("Telegram no longer accepts the bot token in $%s; polling stopped", self.config.token_env)
                return
            except (NetworkError, TelegramError) as exc:  # includes TimedOut and Conflict
                self._poll_failures += 1
                delay = min(2.0**self._poll_failures, 30.0)
                log.warning("Telegram getUpdates failed (%s); trying again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._poll_failures = 0
            self._done_above = {i for i in self._done_above if offset is not None and i >= offset}
            # The others are in hand, or handled and not confirmable yet. Anything else is handled,
            # even an id seen long ago (Telegram redelivering it): storage recognises a repeat.
            fresh = [u for u in updates if u.update_id not in self._in_hand and u.update_id not in self._done_above]
            for update in fresh:
                self._highest = max(self._highest, update.update_id)
                self._accept(update)
            if not fresh and self._in_hand:
                # Telegram answers at once while it holds unconfirmed updates: poll again when the
                # offset can move, or now and then for other chats' news.
                await self._wait_for_progress(offset)

    def _offset(self) -> int | None:
        if self._in_hand:
            return min(self._in_hand)
        return self._highest + 1 if self._highest >= 0 else None

    async def _wait_for_progress(self, offset: int | None) -> None:
        deadline = asyncio.get_running_loop().time() + REPOLL_AFTER
        while self._offset() == offset:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _accept(self, update: Update) -> None:
        self._in_hand.add(update.update_id)
        chat = update.effective_chat
        chat_id = chat.id if chat is not None else 0
        lane = self._chats.setdefault(chat_id, _Lane())
        lane.updates.append(update)
        lane.arrived.set()
        if lane.worker is None:
            lane.worker = asyncio.create_task(self._run_lane(chat_id, lane), name=f"parley-telegram-chat-{chat_id}")

    async def _run_lane(self, chat_id: int, lane: _Lane) -> None:
        try:
            while lane.updates:
                update = lane.updates[0]
                parts = await self._parts_after(lane) if _may_continue(update) else ()
                await self._handle_until_recorded(chat_id, update, parts)
                handled = [lane.updates.popleft() for _ in range(1 + len(parts))]
                for done in handled:
                    self._in_hand.discard(done.update_id)
                    # Kept until a getUpdates sent after now confirms it: one already on its way
                    # (sent with a lower offset) would hand it out again.
                    self._done_above.add(done.update_id)
                self._progress.set()
        finally:
            lane.worker = None
            self._forget_if_idle(chat_id, lane)

    async def _parts_after(self, lane: _Lane) -> tuple[Update, ...]:
        """The updates after the lane's first (a message at the limit) that continue its text,
        waiting up to `JOIN_WAIT` for each next one while the last part found is at the limit."""
        loop = asyncio.get_running_loop()
        parts: list[Update] = []
        last = lane.updates[0]
        while _may_continue(last) and len(parts) < MAX_PARTS:
            deadline = loop.time() + JOIN_WAIT
            while len(lane.updates) <= len(parts) + 1:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return tuple(parts)
                lane.arrived.clear()
                try:
                    await asyncio.wait_for(lane.arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    return tuple(parts)
            following = lane.updates[len(parts) + 1]
            if not _continues(last, following):
                break
            parts.append(following)
            last = following
        return tuple(parts)

    async def _handle_until_recorded(self, chat_id: int, update: Update, parts: tuple[Update, ...] = ()) -> None:
        """Handle one update; while storage is unavailable, wait and try the same update again."""
        delay = STORAGE_RETRY_FIRST
        while True:
            try:
                await self._on_update(update, parts)
            except StorageUnavailable as exc:
                if not self._storage_down:
                    self._storage_down = True
                    log.warning("storage is unavailable (%s); Telegram updates are held and retried", exc)
                self._waiting_on_storage.add(chat_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORAGE_RETRY_MAX)
                continue
            except Exception:
                # A fault of this update, not of storage: log it and let it go (trying it again would
                # fail the same way and hold the chat up for good).
                log.exception("handling Telegram update %s failed", update.update_id)
            self._waiting_on_storage.discard(chat_id)
            if self._storage_down and not self._waiting_on_storage:
                self._storage_down = False
                log.info("storage is available again; held Telegram updates are being handled")
            return

    def _forget_if_idle(self, chat_id: int, lane: _Lane) -> None:
        if lane.idle and self._chats.get(chat_id) is lane:
            del self._chats[chat_id]

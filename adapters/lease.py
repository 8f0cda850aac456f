"""Doing what only one process may do for a platform account, while holding its lease.

Telegram serves one getUpdates consumer per token and Discord one gateway session per token, but
several Parley processes may share a database (and run jobs and send replies together). Each
adapter asks the core for the account's lease (`Core.lease`, a row in the shared database) and
runs its polling or gateway session only while it holds it: `LeaseKeeper.run(work)` takes the
lease when free, runs `work`, renews the lease every quarter of its length and cancels `work` when
the lease goes to another process or could not be renewed before it ran out (the database
unreachable): by then another process may have it. A stopped holder gives the lease up at once;
a dead one is replaced after the lease expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable

from bot.core.contracts import Core
from bot.core.errors import StorageError

__all__ = ["LeaseKeeper", "account_role"]

SAFETY_MARGIN = 0.1  # of the lease: stop acting this much before it could expire elsewhere


def account_role(platform: str, token: str) -> str:
    """The lease's name for a platform account: the platform and a hash of its token, never the token."""
    return f"{platform}:{hashlib.sha256(token.encode()).hexdigest()[:16]}"


class LeaseKeeper:
    """Runs one role's `work` in this process only while it holds the role's lease."""

    def __init__(self, core: Core, role: str, ttl: float, *, what: str, log: logging.Logger) -> None:
        self.core = core
        self.role = role
        self.ttl = ttl
        self.renew_every = ttl / 4
        self.what = what
        self.log = log
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.held = False
        self.answered = asyncio.Event()
        """Set once the first answer came: `held` then says whether this process got the lease."""
        self._told_waiting = False

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled (or `work` returns): wait for the lease, run `work` while holding it."""
        loop = asyncio.get_running_loop()
        while True:
            held_until = await self._ask(None)
            self.held = isinstance(held_until, float)
            self.answered.set()
            if not isinstance(held_until, float):
                if held_until is False and not self._told_waiting:
                    self._told_waiting = True
                    self.log.info(
                        "%s: another process holds it; this one runs jobs and sends replies, "
                        "and takes over if that one stops", self.what,
                    )
                await asyncio.sleep(self.renew_every)
                continue
            self.held, self._told_waiting = True, False
            task = asyncio.ensure_future(work())
            try:
                while True:
                    wait = min(self.renew_every, held_until - loop.time())
                    done, _ = await asyncio.wait({task}, timeout=max(wait, 0.0))
                    if task in done:
                        task.result()
                        return
                    if loop.time() >= held_until:
                        self.log.warning("%s: the lease could not be renewed in time; stopping", self.what)
                        break
                    answer = await self._ask(held_until)
                    if answer is False:
                        self.log.warning("%s: another process took the lease over; stopping", self.what)
                        break
                    if isinstance(answer, float):
                        held_until = answer
            finally:
                self.held = False
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def release(self) -> None:
        """Give the lease up (a clean stop), so another process takes over at once."""
        try:
            await asyncio.wait_for(self.core.release_lease(self.role, self.holder), timeout=5.0)
        except (StorageError, asyncio.TimeoutError) as exc:
            self.log.warning("%s: could not give the lease up (%s); it expires by itself", self.what, exc)

    async def _ask(self, limit: float | None) -> float | bool | None:
        """Held until (this loop's clock, before the database's expiry), False when another holds
        it, None when the database could not say before `limit`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.ttl if limit is None else max(limit - started, 0.01)
        try:
            granted = await asyncio.wait_for(self.core.lease(self.role, self.holder, self.ttl), timeout)
        except (StorageError, asyncio.TimeoutError) as exc:
            self.log.warning("%s: could not reach the database for the lease (%s)", self.what, exc)
            return None
        if not granted:
            return False
        return started + self.ttl * (1 - SAFETY_MARGIN)

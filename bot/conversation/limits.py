"""How often one person may ask the bot: a sliding one-minute window per user and platform."""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable

__all__ = ["UserRateLimit", "RATE_WINDOW"]

RATE_WINDOW = 60.0


class UserRateLimit:
    """At most `per_window` messages per user in any `window` seconds (`[queue] user_messages_per_minute`).

    `clock` returns seconds (monotonic); tests pass their own.
    """

    def __init__(self, per_window: int, *, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window = window
        self.clock = clock
        self._recent: defaultdict[tuple[str, str], deque[float]] = defaultdict(deque)

    def check(self, platform: str, user_id: str) -> int | None:
        """Seconds until this user may send again, or None, in which case the message is counted."""
        now = self.clock()
        recent = self._recent[(platform, user_id)]
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.per_window:
            return max(1, math.ceil(self.window - (now - recent[0])))
        recent.append(now)
        return None

"""How often one person may ask the bot: a sliding one-minute window per user and platform."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["UserRateLimit", "RATE_WINDOW"]

RATE_WINDOW = 60.0


class UserRateLimit:
    """At most `per_window` messages (and commands) per user in any `window` seconds
    (`[queue] user_messages_per_minute`).

    Users whose window has passed are forgotten (at most once per window, all together), so the
    map holds only the people heard from lately. `clock` returns seconds (monotonic); tests pass
    their own.
    """

    def __init__(self, per_window: int, *, window: float = RATE_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window = window
        self.clock = clock
        self._recent: dict[tuple[str, str], deque[float]] = {}
        self._next_sweep = clock() + window

    def __len__(self) -> int:
        """How many users are remembered."""
        return len(self._recent)

    def check(self, platform: str, user_id: str) -> int | None:
        """Seconds until this user may send again, or None, in which case the message is counted."""
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        recent = self._recent.setdefault((platform, user_id), deque())
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.per_window:
            return max(1, math.ceil(self.window - (now - recent[0])))
        recent.append(now)
        return None

    def _sweep(self, now: float) -> None:
        self._recent = {key: times for key, times in self._recent.items() if times and now - times[-1] <= self.window}
        self._next_sweep = now + self.window

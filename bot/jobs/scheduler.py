"""The fair order of queued jobs, as pure logic (no I/O, no clock): one computation that both
dispatch and the positions users are told come from.

Rules, in order:
- Conversations whose platform does not run in this process are parked: their jobs wait.
- A job that was in a backend that went down (`attempts > 0`) is a suspect: it may be the one that
  brings the backend down. Suspects go first, one at a time, alone (after the running jobs end), so
  a poisoned job fails by itself and never takes other conversations' jobs with it.
- Otherwise round-robin across conversations, the one served longest ago first (ties: the older
  first job), at most one running job per conversation (its history must stay in order).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["QueuedJob", "FairScheduler"]


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the scheduler needs to know of a queued job."""

    id: int
    conversation_id: int
    attempts: int = 0

    @property
    def suspect(self) -> bool:
        return self.attempts > 0


class FairScheduler:
    """Remembers when each conversation was last served; orders and picks queued jobs."""

    def __init__(self) -> None:
        self._served = 0
        self._last_served: dict[int, int] = {}  # conversation id → dispatch counter

    def served(self, conversation_id: int) -> None:
        """A job of this conversation was dispatched now."""
        self._served += 1
        self._last_served[conversation_id] = self._served

    def order(self, queued: Iterable[QueuedJob], *, parked: Collection[int] = ()) -> list[QueuedJob]:
        """Every queued job that can run here, in the order it will be dispatched."""
        jobs = sorted((job for job in queued if job.conversation_id not in parked), key=lambda job: job.id)
        suspects = [job for job in jobs if job.suspect]
        per_conversation: dict[int, list[QueuedJob]] = {}
        for job in jobs:
            if not job.suspect:
                per_conversation.setdefault(job.conversation_id, []).append(job)
        conversations = sorted(
            per_conversation, key=lambda c: (self._last_served.get(c, -1), per_conversation[c][0].id)
        )
        order = list(suspects)
        depth = max((len(v) for v in per_conversation.values()), default=0)
        for round_ in range(depth):
            order += [per_conversation[c][round_] for c in conversations if round_ < len(per_conversation[c])]
        return order

    @staticmethod
    def pick(
        order: Sequence[QueuedJob], *, busy_conversations: Collection[int], running: int, capacity: int, isolated: bool
    ) -> list[QueuedJob]:
        """The jobs of `order` (from `order()`) to start now.

        `running` jobs hold `busy_conversations`; `isolated` is true while a suspect runs alone.
        """
        if isolated or not order:
            return []
        if order[0].suspect:
            return [order[0]] if running == 0 else []
        picks: list[QueuedJob] = []
        taken = set(busy_conversations)
        for job in order:
            if len(picks) >= capacity - running:
                break
            if job.conversation_id not in taken:
                taken.add(job.conversation_id)
                picks.append(job)
        return picks

    @staticmethod
    def position(order: Sequence[QueuedJob], job_id: int) -> int | None:
        """1 for the next job to go, 2 for the one after...; None if not in `order`."""
        for index, job in enumerate(order):
            if job.id == job_id:
                return index + 1
        return None

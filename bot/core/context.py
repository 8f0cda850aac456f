"""Context that travels with a task: the job being worked on, for the ` job=N` of log lines
(set by the job queue, read by the runtime's log filter)."""

from __future__ import annotations

import contextvars

__all__ = ["current_job"]

current_job: contextvars.ContextVar[int | None] = contextvars.ContextVar("parley_job", default=None)

"""Parley's exceptions: one family, one subclass per layer, so callers can catch what they can handle."""

from __future__ import annotations

__all__ = [
    "ParleyError",
    "ConfigError",
    "StorageError",
    "AdapterError",
    "RateLimited",
    "QueueFull",
    "GenerationError",
    "JobFailed",
    "WorkerDead",
    "WorkerStartError",
]


class ParleyError(Exception):
    """Base of every error Parley raises on purpose."""


class ConfigError(ParleyError):
    """The configuration is invalid; the message names the key and what is allowed."""


class StorageError(ParleyError):
    """The database could not be reached or migrated."""


class AdapterError(ParleyError):
    """A platform adapter could not start or talk to its platform."""


class RateLimited(AdapterError):
    """The platform asked us to slow down; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, message: str = "") -> None:
        super().__init__(message or f"rate limited, retry after {retry_after:.1f}s")
        self.retry_after = retry_after


class QueueFull(ParleyError):
    """Too many jobs are waiting; the user is told to try again later."""


class GenerationError(ParleyError):
    """Base of the errors a GenerationClient raises."""


class JobFailed(GenerationError):
    """The worker is fine but this one job failed (bad prompt, out of memory for this batch...)."""


class WorkerDead(GenerationError):
    """The worker process died (or stopped answering) while it held the job; the job may be retried."""


class WorkerStartError(GenerationError):
    """The worker did not come up: it crashed while loading or missed the READY deadline."""

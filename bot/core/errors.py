"""Parley's exceptions: one family, one subclass per layer, so callers can catch what they can handle."""

from __future__ import annotations

__all__ = [
    "ParleyError",
    "ConfigError",
    "StorageError",
    "JobNotOwned",
    "StorageUnavailable",
    "UpdateAlreadyHandled",
    "AdapterError",
    "QueueFull",
    "GenerationError",
    "JobFailed",
    "BackendDown",
    "BackendBusy",
    "BackendStartError",
    "WorkerDead",
    "WorkerStartError",
]


class ParleyError(Exception):
    """Base of every error Parley raises on purpose."""


class ConfigError(ParleyError):
    """The configuration is invalid; the message names the key and what is allowed."""


class StorageError(ParleyError):
    """The database could not be reached or migrated."""


class StorageUnavailable(StorageError):
    """The database cannot be used for now (locked past its busy timeout, disk full, server down).

    Nothing was recorded; the same operation may succeed later. An adapter that can have an
    update delivered again leaves it unconfirmed and retries it instead of answering."""


class UpdateAlreadyHandled(ParleyError):
    """A platform update was handled before (delivered again after a crash): it changes nothing."""


class AdapterError(ParleyError):
    """A platform adapter could not start or talk to its platform."""


class QueueFull(ParleyError):
    """Too many jobs are waiting: `count` already waiting where `limit` allows `maximum`.

    `limit` is a `bot.core.contracts.QueueLimit`; the sentence users read is rendered by
    `bot.conversation.messages`, not here."""

    def __init__(self, limit: object, count: int, maximum: int) -> None:
        super().__init__(f"{count} waiting, {getattr(limit, 'value', limit)} = {maximum}")
        self.limit = limit
        self.count = count
        self.maximum = maximum


class GenerationError(ParleyError):
    """Base of the errors a GenerationClient raises."""


class JobFailed(GenerationError):
    """The worker is fine but this one job failed (bad prompt, out of memory for this batch...)."""


class BackendDown(GenerationError):
    """The generation backend went away while it held the job (a worker process died, a model
    server became unreachable); the job itself may be fine and may be retried."""


class BackendBusy(JobFailed):
    """The model server stayed busy or failing (HTTP 408, 429, 5xx) past the time allowed to wait
    for it: the job failed without any sign that it hurt the backend, so it is no suspect; the
    message names the server's answer."""


class BackendStartError(GenerationError):
    """The generation backend did not come up; the message names the setting to change."""


class WorkerDead(BackendDown):
    """The worker process died (or stopped answering) while it held the job."""


class WorkerStartError(BackendStartError):
    """The worker process did not come up: it crashed while loading or missed the READY deadline."""


class JobNotOwned(StorageError):
    """This process no longer owns the job (a sibling took it over after missing heartbeats, or it
    was queued again): the attempt stops and stores nothing more of it."""

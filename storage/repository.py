"""The storage operations the core (router, commands, queue) calls: `Repository`.

Every method is one transaction of its own. Results are ORM objects of `storage.models`, loaded
completely and detached from their session (`expire_on_commit=False`): read them freely, but
changing an attribute changes nothing in the database — call a method here instead. They have no
relationships to lazy-load, so nothing touches the database after a method returns.

Database failures surface as `StorageError`: `StorageUnavailable` when the database cannot be
used for now (unreachable, locked past the busy timeout, disk full) and the same call may work
later, a plain `StorageError` for the rest (a constraint broken). A missing row that a method
must act on is `RecordNotFound`.
"""

from __future__ import annotations

from storage.base import (
    DEFAULT_STALE_AFTER,
    GENERATION_KEYS,
    HEARTBEAT_INTERVAL,
    UNCHANGED,
    RecordNotFound,
    Unchanged,
    default_owner,
)
from storage.catalog import ConversationCatalog
from storage.controls import ControlRecords
from storage.conversations import ConversationRecords
from storage.export import PersonalData
from storage.jobs import JobRecords
from storage.leases import LeaseRecords
from storage.retention import RetentionRecords
from storage.updates import HandledUpdate

__all__ = [
    "Repository",
    "HandledUpdate",
    "RecordNotFound",
    "UNCHANGED",
    "Unchanged",
    "GENERATION_KEYS",
    "DEFAULT_STALE_AFTER",
    "HEARTBEAT_INTERVAL",
    "default_owner",
]


class Repository(ConversationRecords, JobRecords, ControlRecords, ConversationCatalog, LeaseRecords, RetentionRecords, PersonalData):
    """Parley's storage operations over an `async_sessionmaker` (`Database.sessions`).

    `owner` identifies this bot process in `jobs.owner` (default: `default_owner()`); give each
    process sharing a database its own. Running jobs are kept alive with `heartbeat()` every
    `heartbeat_interval`.
    """

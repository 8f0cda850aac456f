"""Parley's storage: SQLAlchemy 2.0 models, the async engine with its migrations, the repository.

    database = Database(settings.database_url())
    await database.start()                 # connects and upgrades the schema to head
    repository = Repository(database.sessions)
    ...
    await database.stop()

`upgrade_database(url)` is the sync entry point for `parley db upgrade`.
"""

from .db import Database, alembic_config, head_revision, mask_url, upgrade_database
from .models import AuditEntry, Base, Conversation, HandledUpdateEntry, Job, Message
from .repository import (
    DEFAULT_STALE_AFTER,
    GENERATION_KEYS,
    HEARTBEAT_INTERVAL,
    UNCHANGED,
    HandledUpdate,
    RecordNotFound,
    Repository,
    Unchanged,
    default_owner,
)

__all__ = [
    "Database",
    "upgrade_database",
    "alembic_config",
    "head_revision",
    "mask_url",
    "Base",
    "Conversation",
    "Message",
    "Job",
    "AuditEntry",
    "HandledUpdateEntry",
    "HandledUpdate",
    "Repository",
    "RecordNotFound",
    "UNCHANGED",
    "Unchanged",
    "GENERATION_KEYS",
    "DEFAULT_STALE_AFTER",
    "HEARTBEAT_INTERVAL",
    "default_owner",
]

"""Alembic environment (the async template, plus connection sharing and SQLite batch mode).

Two ways in:
* Parley itself (`storage.db.Database.upgrade`, `parley db upgrade`) passes its own connection in
  `config.attributes["connection"]`; the migrations run on it inside the caller's transaction.
* The `alembic` command line: the URL comes from `-x url=…`, else `sqlalchemy.url` in the ini
  file, else Parley's configuration (`PARLEY_CONFIG` or ./config.toml, as the bot would use).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection

from storage.db import WRITE_OPTION, create_engine
from storage.models import Base

config = context.config

# Configure logging only from an ini file that has logging sections (Parley's generated configs do not).
if config.config_file_name is not None and config.file_config.has_section("loggers"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from bot.core.config import load_settings

    return load_settings().database_url()


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode rebuilds the table
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`) without a database."""
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    connectable = create_engine(_database_url(), poolclass=pool.NullPool)
    try:
        async with connectable.execution_options(**{WRITE_OPTION: True}).connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await connectable.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        asyncio.run(run_async_migrations())
    else:
        do_run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

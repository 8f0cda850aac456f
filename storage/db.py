"""The async engine, its sessions, and schema upgrades with the real Alembic migrations.

`Database.start()` connects and upgrades the schema to the newest revision, so a new release
migrates an old database on its first start. `upgrade_database(url)` does the same for
`parley db upgrade`. Both run the migrations over the application's own async engine, with
Alembic's "connection sharing" recipe (the connection travels in `config.attributes`);
`migrations/env.py` still works from the `alembic` command line on its own.

SQLite connections get WAL journaling, enforced foreign keys, a busy timeout and
`synchronous=NORMAL`. SQLAlchemy, not the sqlite3 driver, emits BEGIN (the recipe from
SQLAlchemy's SQLite docs), so reads are part of their transaction; transactions opened with
the execution option `WRITE_OPTION` start with `BEGIN IMMEDIATE`, which takes the write lock
up front: concurrent writers wait for each other (up to the busy timeout) instead of failing
on a stale snapshot, and read-check-write sequences (queue limits) are serialized.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event, pool
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bot.core.errors import StorageError

__all__ = [
    "Database",
    "upgrade_database",
    "alembic_config",
    "create_engine",
    "head_revision",
    "mask_url",
    "normalize_url",
    "WRITE_OPTION",
    "SQLITE_BUSY_TIMEOUT_MS",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

WRITE_OPTION = "parley_write"
"""Execution option marking a transaction that will write (`BEGIN IMMEDIATE` on SQLite)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000

# The async driver used when a URL names only the database ("sqlite:///…").
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


def _migrations_folder() -> Path:
    # Located, not imported: the scripts there import storage (env.py), and Alembic loads them.
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise StorageError("the migrations package is not installed beside storage")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def mask_url(url: str | URL) -> str:
    """The URL with any password replaced by ***, safe for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        # Unparseable: hide whatever sits between "user:" and "@".
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def normalize_url(url: str | URL) -> URL:
    """Parse `url`, choosing the async driver where the URL names none ("sqlite:///x.db")."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"database URL {mask_url(url)!r} is not a valid SQLAlchemy URL: {exc}") from None
    if parsed.drivername in _ASYNC_DRIVERS:
        parsed = parsed.set(drivername=_ASYNC_DRIVERS[parsed.drivername])
    return parsed


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or _is_sqlite_memory(url):
        return None
    database = url.database or ""
    if database.startswith("file:"):  # a URI filename (uri=true); leave it to SQLite
        return None
    return Path(database)


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`, with Parley's SQLite connection set-up. No I/O happens here."""
    parsed = normalize_url(url)
    if _is_sqlite_memory(parsed) and "poolclass" not in kwargs:
        # One shared connection is the only way an in-memory database outlives a checkout, but the
        # default StaticPool lets concurrent sessions interleave on it; a pool of one makes them wait.
        kwargs.update(poolclass=pool.AsyncAdaptedQueuePool, pool_size=1, max_overflow=0)
    try:
        engine = create_async_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        raise StorageError(
            f"database URL {mask_url(parsed)!r} needs a driver that is not installed ({exc}); "
            "install it or change [storage] url"
        ) from exc
    except (ArgumentError, SQLAlchemyError) as exc:
        raise StorageError(f"database URL {mask_url(parsed)!r} cannot be used: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: AsyncEngine) -> None:
    memory = _is_sqlite_memory(engine.url)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Stop the driver from emitting BEGIN itself; `_on_begin` does it (see module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            # FULL: in WAL mode a commit is on disk when it returns, even through a power cut;
            # NORMAL would only survive a process crash. Replies are few; durability wins.
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic `Config` for the packaged migrations; no alembic.ini needed.

    With `url`, `migrations/env.py` connects on its own (the `alembic` command line path);
    without, pass a connection in `config.attributes["connection"]`.
    """
    config = Config()
    config.set_main_option("script_location", str(_migrations_folder()))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def _upgrade_on(connection: Connection, config: Config, revision: str) -> str | None:
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
    return MigrationContext.configure(connection).get_current_revision()


def _current_on(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


class Database:
    """The application's database: an async engine, its session factory, and its schema.

    `async with Database(url) as db:` or `await db.start()` … `await db.stop()`.
    """

    def __init__(self, url: str) -> None:
        self._url = normalize_url(url)
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @property
    def url(self) -> str:
        """The URL with its password masked."""
        return mask_url(self._url)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.start() has not been called")
        return self._engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._sessions is None:
            raise RuntimeError("Database.start() has not been called")
        return self._sessions

    @property
    def dialect_name(self) -> str:
        return self._url.get_backend_name()

    async def start(self) -> None:
        """Connect and upgrade the schema to the newest revision; `StorageError` if either fails."""
        if self._engine is not None:
            return
        path = _sqlite_file(self._url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"cannot create the folder {str(path.parent)!r} for database {self.url!r}: "
                    f"{exc.strerror or exc}"
                ) from exc
            try:
                # Conversations are private: the database (and its -wal/-shm files, which SQLite
                # creates with the main file's mode) is readable by its owner only.
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
                os.chmod(path, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot create the database file {str(path)!r}: {exc.strerror or exc}") from exc
        threads_before = set(threading.enumerate())
        engine = create_engine(self._url)
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            revision = await self.upgrade()
        except BaseException:
            await self.stop()
            await _let_driver_threads_finish(threads_before)
            raise
        log.info("database %s ready at revision %s", self.url, revision)

    async def stop(self) -> None:
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None:
            await engine.dispose()

    async def __aenter__(self) -> Database:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def upgrade(self, revision: str = "head") -> str:
        """Run the migrations up to `revision` over this engine; return the database's revision."""
        config = alembic_config()
        try:
            async with self.engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
                current = await conn.run_sync(_upgrade_on, config, revision)
        except CommandError as exc:
            raise StorageError(
                f"cannot migrate database {self.url!r}: {exc} "
                "(was it made by a newer Parley? Upgrade Parley, or point [storage] url elsewhere)"
            ) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(f"cannot open or migrate database {self.url!r}: {_describe(exc)}") from exc
        return current or "base"

    async def current_revision(self) -> str | None:
        """The revision the database is at (None before the first migration)."""
        try:
            async with self.engine.connect() as conn:
                return await conn.run_sync(_current_on)
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(f"cannot read database {self.url!r}: {_describe(exc)}") from exc


async def _let_driver_threads_finish(threads_before: set[threading.Thread], timeout: float = 2.0) -> None:
    """After a failed connect, wait (briefly) for aiosqlite's worker threads to wind down.

    aiosqlite stops a connection that failed to open (or that SQLAlchemy terminates) without
    awaiting it; its thread later reports back to this event loop, and if the loop has closed
    by then the thread dies with "Event loop is closed". Keeping the loop alive until the
    threads end makes a failed start clean.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        stragglers = [
            thread
            for thread in threading.enumerate()
            if thread not in threads_before and thread.name.endswith("(_connection_worker_thread)")
        ]
        if not stragglers:
            return
        await asyncio.sleep(0.01)


def _describe(exc: BaseException) -> str:
    """A short reason: the driver's own message, without SQLAlchemy's SQL and parameters dump."""
    orig = getattr(exc, "orig", None)
    if orig is not None:
        return f"{type(orig).__name__}: {orig}"
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion from sync code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed back to the calling thread below
            error.append(exc)

    thread = threading.Thread(target=target, name="parley-db-upgrade")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def upgrade_database(url: str) -> str:
    """Upgrade the database at `url` to the newest revision and return that revision.

    Sync, for `parley db upgrade`; raises `StorageError` naming the (masked) URL on failure.
    """

    async def upgrade() -> str:
        database = Database(url)
        await database.start()  # start() upgrades
        try:
            return await database.current_revision() or "base"
        finally:
            await database.stop()

    return _run_coroutine(upgrade())

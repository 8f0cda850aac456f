"""Storage against real SQLite files, migrated by the real Alembic migrations."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import given, settings
from hypothesis import strategies as st
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text

from bot.conversation.history import effective_settings
from bot.core.contracts import QueueLimit
from bot.core.errors import QueueFull, StorageError
from bot.core.types import ConversationKey, GenerationSettings, JobStatus, Role
from storage import (
    UNCHANGED,
    Base,
    Database,
    RecordNotFound,
    Repository,
    alembic_config,
    head_revision,
    mask_url,
    upgrade_database,
)

from tests.pg_server import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)
from tests.support import running_jobs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLES = {"conversations", "messages", "jobs", "audit_log"}
ALICE = {"author_id": "u1", "author_name": "Alice"}
BIG = {"max_pending": 1000, "max_pending_per_conversation": 1000}


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "parley.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Each storage test runs on a fresh SQLite file and on a fresh PostgreSQL database (skipped,
    saying why, where no PostgreSQL server can be had; see tests/pg_server.py)."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return sqlite_url(db_path)


@pytest.fixture
def sqlite_only(database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite-specific")


@pytest.fixture
async def database(database_url: str) -> Any:
    database = Database(database_url)
    await database.start()
    yield database
    await database.stop()


@pytest.fixture
def repo(database: Database) -> Repository:
    return Repository(database.sessions)


@pytest.fixture
async def conversation_id(repo: Repository) -> int:
    return (await repo.get_or_create_conversation(ConversationKey("discord", "123"), is_direct=False)).id


async def enqueue(repo: Repository, conversation_id: int, message_id: str | None, **limits: int) -> Any:
    return await repo.record_and_enqueue(
        conversation_id, **ALICE, text=f"hello {message_id}", platform_message_id=message_id, **(limits or BIG)
    )


# -- migrations -----------------------------------------------------------------------------------


async def test_start_migrates_a_fresh_database_and_creates_its_folder(
    database: Database, db_path: Path, database_url: str
) -> None:
    if database.dialect_name == "sqlite":
        assert db_path.exists()  # the "data" folder did not exist before start()
    async with database.engine.connect() as conn:
        names = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
        columns = await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("jobs")})
    assert TABLES | {"alembic_version"} <= names
    assert {"status", "attempts", "prompt", "reply_message_id", "started_at", "finished_at"} <= columns
    assert await database.current_revision() == head_revision()


async def test_migrated_schema_matches_the_models(database: Database) -> None:
    def differences(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with database.engine.connect() as conn:
        assert await conn.run_sync(differences) == []


async def test_upgrading_twice_is_a_no_op(database: Database, repo: Repository, conversation_id: int) -> None:
    await repo.record_message(conversation_id, role=Role.USER, **ALICE, text="keep me", platform_message_id="1")
    assert await database.upgrade() == head_revision()
    assert await database.upgrade() == head_revision()
    async with database.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert versions == [(head_revision(),)]
    assert [m.text for m in await repo.history(conversation_id)] == ["keep me"]


async def test_restart_keeps_data(db_path: Path) -> None:
    async with Database(sqlite_url(db_path)) as first:
        repo = Repository(first.sessions)
        conversation = await repo.get_or_create_conversation(ConversationKey("telegram", "42"), is_direct=True)
        await repo.record_message(conversation.id, role="user", **ALICE, text="hi", platform_message_id="1")
    async with Database(sqlite_url(db_path)) as second:
        again = await Repository(second.sessions).get_or_create_conversation(
            ConversationKey("telegram", "42"), is_direct=False
        )
        assert again.id == conversation.id and again.is_direct is True
        assert [m.text for m in await Repository(second.sessions).history(again.id)] == ["hi"]


def test_alembic_api_downgrade_to_base_and_up_again(tmp_path: Path) -> None:
    path = tmp_path / "parley.db"
    assert upgrade_database(sqlite_url(path)) == head_revision()
    assert TABLES <= table_names(path)

    config = alembic_config(sqlite_url(path))  # env.py's own-engine path, as the alembic CLI uses
    command.downgrade(config, "base")
    assert table_names(path) == {"alembic_version"}
    command.upgrade(config, "head")
    assert TABLES <= table_names(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


def test_alembic_command_line_with_a_generated_ini(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    ini = tmp_path / "alembic.ini"
    script_location = REPO_ROOT / "migrations"
    ini.write_text(
        f"[alembic]\nscript_location = {script_location}\npath_separator = os\n"
        f"sqlalchemy.url = sqlite+aiosqlite:///{path}\n"
    )

    def alembic(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    alembic("upgrade", "head")
    assert TABLES <= table_names(path)
    assert head_revision() in alembic("current")
    alembic("downgrade", "base")
    assert table_names(path) == {"alembic_version"}
    alembic("upgrade", "head")
    assert TABLES <= table_names(path)
    assert "CREATE TABLE jobs" in alembic("upgrade", "head", "--sql")  # offline mode renders too


async def test_sqlite_pragmas(sqlite_only: None, database: Database) -> None:
    async with database.engine.connect() as conn:
        pragma = {
            name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        }
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30000, "synchronous": 2}  # FULL


# -- errors ---------------------------------------------------------------------------------------


async def test_unreachable_database_is_a_storage_error_with_the_password_masked() -> None:
    database = Database("postgresql+asyncpg://bob:s3cret-pw@127.0.0.1:1/parley")
    with pytest.raises(StorageError) as caught:
        await database.start()
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "bob:***@127.0.0.1:1/parley" in message


async def test_invalid_url_is_a_storage_error_with_the_password_masked() -> None:
    with pytest.raises(StorageError) as caught:
        Database("not a url://bob:s3cret-pw@host/db")
    assert "s3cret-pw" not in str(caught.value)
    assert "not a valid SQLAlchemy URL" in str(caught.value)
    assert mask_url("postgresql://bob:s3cret-pw@host/db") == "postgresql://bob:***@host/db"


async def test_a_file_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a SQLite database, not even close" * 100)
    database = Database(sqlite_url(path))
    with pytest.raises(StorageError, match="garbage.db"):
        await database.start()
    with pytest.raises(RuntimeError):
        database.sessions  # noqa: B018 - stopped again after the failed start


async def test_an_uncreatable_folder_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageError, match="cannot create the folder"):
        await Database(sqlite_url(blocker / "sub" / "parley.db")).start()


async def test_a_database_from_a_newer_release_is_refused(db_path: Path) -> None:
    async with Database(sqlite_url(db_path)) as database:
        async with database.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    with pytest.raises(StorageError, match="newer Parley"):
        await Database(sqlite_url(db_path)).start()


async def test_foreign_keys_are_enforced(repo: Repository) -> None:
    with pytest.raises(StorageError, match="(?i)foreign key"):
        await repo.record_message(999, role=Role.USER, **ALICE, text="orphan")


# -- conversations and messages -------------------------------------------------------------------


async def test_get_or_create_conversation_is_race_safe(repo: Repository) -> None:
    key = ConversationKey("discord", "777")
    made = await asyncio.gather(*(repo.get_or_create_conversation(key, is_direct=False) for _ in range(20)))
    assert len({c.id for c in made}) == 1
    other = await repo.get_or_create_conversation(ConversationKey("telegram", "777"), is_direct=True)
    assert other.id != made[0].id and other.conversation_key == ConversationKey("telegram", "777")
    assert made[0].created_at.tzinfo is not None and made[0].created_at.utcoffset().total_seconds() == 0


async def test_record_message_is_idempotent_per_conversation(repo: Repository, conversation_id: int) -> None:
    first, created = await repo.record_message(
        conversation_id, role=Role.USER, **ALICE, text="hi", platform_message_id="m1"
    )
    again, created_again = await repo.record_message(
        conversation_id, role=Role.USER, **ALICE, text="hi (redelivered)", platform_message_id="m1"
    )
    assert created and not created_again
    assert again.id == first.id and again.text == "hi"
    other = await repo.get_or_create_conversation(ConversationKey("discord", "456"), is_direct=False)
    elsewhere, created_elsewhere = await repo.record_message(
        other.id, role=Role.USER, **ALICE, text="hi", platform_message_id="m1"
    )
    assert created_elsewhere and elsewhere.id != first.id
    # Messages without a platform id never collide.
    a, _ = await repo.record_message(conversation_id, role=Role.SYSTEM, author_id="bot", author_name="P", text="x")
    b, _ = await repo.record_message(conversation_id, role=Role.SYSTEM, author_id="bot", author_name="P", text="x")
    assert a.id != b.id
    assert [m.id for m in await repo.history(conversation_id)] == [first.id, a.id, b.id]
    assert [m.id for m in await repo.history(other.id)] == [elsewhere.id]


async def test_record_message_keeps_roles_and_times(repo: Repository, conversation_id: int) -> None:
    sent = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    message, _ = await repo.record_message(
        conversation_id, role="assistant", **ALICE, text="t", platform_message_id="9", reply_to="8", created_at=sent
    )
    stored = await repo.get_message(message.id)
    assert stored is not None
    assert stored.role is Role.ASSISTANT and stored.role == "assistant"
    assert stored.created_at == sent and stored.created_at.tzinfo is not None
    assert stored.reply_to == "8" and stored.archived is False and stored.edited_at is None
    with pytest.raises(ValueError):
        await repo.record_message(conversation_id, role="wizard", **ALICE, text="t")


async def test_update_message_text_sets_edited_at(repo: Repository, conversation_id: int) -> None:
    message, _ = await repo.record_message(conversation_id, role=Role.USER, **ALICE, text="helo", platform_message_id="5")
    assert await repo.update_message_text(conversation_id, "5", "hello") is True
    assert await repo.update_message_text(conversation_id, "nope", "x") is False
    (edited,) = await repo.history(conversation_id)
    assert edited.text == "hello" and edited.edited_at is not None


async def test_history_up_to_a_message(repo: Repository, conversation_id: int) -> None:
    ids = [
        (await repo.record_message(conversation_id, role=Role.USER, **ALICE, text=str(i), platform_message_id=str(i)))[0].id
        for i in range(5)
    ]
    assert [m.id for m in await repo.history(conversation_id, up_to_message_id=ids[2])] == ids[:3]
    assert [m.text for m in await repo.history(conversation_id)] == ["0", "1", "2", "3", "4"]


async def test_settings_and_system_prompt(repo: Repository, conversation_id: int) -> None:
    defaults = GenerationSettings()
    conversation = await repo.get_conversation(conversation_id)
    assert conversation is not None and conversation.system_prompt is None
    assert effective_settings(conversation, defaults) == defaults

    updated = await repo.set_generation(conversation_id, temperature=0.7, max_new_tokens=64)
    assert effective_settings(updated, defaults) == GenerationSettings(temperature=0.7, top_p=defaults.top_p, max_new_tokens=64)
    assert updated.updated_at >= conversation.updated_at
    updated = await repo.set_generation(conversation_id, temperature=None)
    assert updated.temperature is None and updated.max_new_tokens == 64
    with pytest.raises(ValueError, match="unknown generation setting"):
        await repo.set_generation(conversation_id, top_k=5)

    assert (await repo.set_system_prompt(conversation_id, "Be terse.")).system_prompt == "Be terse."
    assert (await repo.set_system_prompt(conversation_id, None)).system_prompt is None
    with pytest.raises(RecordNotFound):
        await repo.set_system_prompt(999, "x")
    assert await repo.get_conversation(999) is None


async def test_audit_log(repo: Repository, conversation_id: int) -> None:
    await repo.audit(conversation_id, platform="discord", actor_id="u1", actor_name="Alice", action="reset", detail="")
    await repo.audit(
        conversation_id, platform="discord", actor_id="u2", actor_name="Bob", action="set", detail="temperature=0.5"
    )
    log = await repo.audit_log(conversation_id)
    assert [(e.action, e.actor_name, e.detail) for e in log] == [("reset", "Alice", ""), ("set", "Bob", "temperature=0.5")]
    assert all(e.created_at.tzinfo is not None for e in log)


# -- enqueueing -----------------------------------------------------------------------------------


async def test_record_and_enqueue_creates_a_queued_job(repo: Repository, conversation_id: int) -> None:
    message, job, created = await enqueue(repo, conversation_id, "m1")
    assert created and job is not None
    assert job.status is JobStatus.QUEUED and job.message_id == message.id and job.attempts == 0
    assert job.conversation_id == conversation_id and job.prompt is None and job.reply_message_id is None
    assert message.role is Role.USER
    assert [j.id for j in await repo.queued_jobs()] == [job.id]
    assert await repo.pending_count() == 1 and await repo.pending_count(conversation_id) == 1


async def test_record_and_enqueue_duplicate_makes_one_job(repo: Repository, conversation_id: int) -> None:
    message, job, created = await enqueue(repo, conversation_id, "m1")
    again, same_job, created_again = await enqueue(repo, conversation_id, "m1")
    assert created and not created_again
    assert again.id == message.id and same_job is not None and job is not None and same_job.id == job.id
    assert len(await repo.queued_jobs()) == 1
    assert len(await repo.history(conversation_id)) == 1
    # A message first recorded only as context gets no job when it comes again.
    await repo.record_message(conversation_id, role=Role.USER, **ALICE, text="ctx", platform_message_id="m2")
    _, none_job, created_ctx = await enqueue(repo, conversation_id, "m2")
    assert none_job is None and not created_ctx


async def test_queue_full_keeps_the_message(repo: Repository, conversation_id: int) -> None:
    limits = {"max_pending": 10, "max_pending_per_conversation": 2}
    await enqueue(repo, conversation_id, "1", **limits)
    await enqueue(repo, conversation_id, "2", **limits)
    with pytest.raises(QueueFull) as full:
        await enqueue(repo, conversation_id, "3", **limits)
    assert (full.value.limit, full.value.count, full.value.maximum) == (QueueLimit.CONVERSATION, 2, 2)
    assert [m.platform_message_id for m in await repo.history(conversation_id)] == ["1", "2", "3"]
    assert await repo.pending_count(conversation_id) == 2

    other = await repo.get_or_create_conversation(ConversationKey("console", "default"), is_direct=True)
    with pytest.raises(QueueFull) as full:
        await enqueue(repo, other.id, "x", max_pending=2, max_pending_per_conversation=5)
    assert (full.value.limit, full.value.count, full.value.maximum) == (QueueLimit.TOTAL, 2, 2)
    assert [m.text for m in await repo.history(other.id)] == ["hello x"]
    # A finished job frees its place.
    (first, *_) = await repo.queued_jobs()
    assert await repo.cancel_job(first.id)
    _, job, created = await enqueue(repo, conversation_id, "4", **limits)
    assert created and job is not None


# -- job lifecycle --------------------------------------------------------------------------------


async def test_job_lifecycle(repo: Repository, conversation_id: int) -> None:
    message, job, _ = await enqueue(repo, conversation_id, "m1")
    assert job is not None
    prompt = [{"role": "user", "content": "hello m1"}]
    assert await repo.mark_running(job.id, prompt) is True
    assert await repo.mark_running(job.id, prompt) is False  # only from queued
    running = await repo.get_job(job.id)
    assert running is not None and running.status is JobStatus.RUNNING and running.prompt == prompt
    assert running.started_at is not None and running.attempts == 0
    assert [j.id for j in await running_jobs(repo)] == [job.id] and await repo.queued_jobs() == []

    assert await repo.requeue_job(job.id, "worker died") == 1
    requeued = await repo.get_job(job.id)
    assert requeued is not None and requeued.status is JobStatus.QUEUED and requeued.error == "worker died"
    assert await repo.requeue_job(job.id, "not running") == 1  # unchanged when not running

    assert await repo.mark_running(job.id, prompt)
    assert await repo.fail_job(job.id, "out of memory") is True
    assert await repo.fail_job(job.id, "again") is False
    failed = await repo.get_job(job.id)
    assert failed is not None and failed.status is JobStatus.FAILED and failed.finished_at is not None
    assert await repo.cancel_job(job.id) is False
    assert await repo.get_job(12345) is None
    with pytest.raises(RecordNotFound):
        await repo.requeue_job(12345, "x")


async def test_finish_job_records_the_reply_and_marks_done(repo: Repository, conversation_id: int) -> None:
    question, job, _ = await enqueue(repo, conversation_id, "q1")
    assert job is not None and await repo.mark_running(job.id, [])
    reply = await repo.finish_job(job.id, reply_text="Hi Alice!", author_id="bot", author_name="Parley", platform_message_id="r1")
    assert reply.role is Role.ASSISTANT and reply.reply_to == "q1" and reply.text == "Hi Alice!"
    done = await repo.get_job(job.id)
    assert done is not None and done.status is JobStatus.DONE
    assert done.reply_message_id == reply.id and done.finished_at is not None
    assert [m.id for m in await repo.history(conversation_id)] == [question.id, reply.id]
    assert await repo.pending_count() == 0


async def test_finish_job_is_atomic(database: Database, repo: Repository, conversation_id: int) -> None:
    _, job, _ = await enqueue(repo, conversation_id, "q1")
    assert job is not None and await repo.mark_running(job.id, [])

    def break_job_updates(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            raise RuntimeError("disk unplugged")

    event.listen(database.engine.sync_engine, "before_cursor_execute", break_job_updates)
    try:
        with pytest.raises(RuntimeError, match="disk unplugged"):
            await repo.finish_job(job.id, reply_text="lost", author_id="bot", author_name="P", platform_message_id="r1")
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", break_job_updates)

    assert [m.role for m in await repo.history(conversation_id)] == [Role.USER]  # the reply rolled back
    still = await repo.get_job(job.id)
    assert still is not None and still.status is JobStatus.RUNNING and still.reply_message_id is None


async def test_finish_after_cancel_keeps_the_reply_out_of_history(repo: Repository, conversation_id: int) -> None:
    _, job, _ = await enqueue(repo, conversation_id, "q1")
    assert job is not None and await repo.mark_running(job.id, [])
    assert await repo.cancel_job(job.id)
    reply = await repo.finish_job(job.id, reply_text="late", author_id="bot", author_name="P", platform_message_id="r")
    assert reply.archived
    cancelled = await repo.get_job(job.id)
    assert cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert [m.text for m in await repo.history(conversation_id)] == ["hello q1"]


async def test_reset_archives_and_cancels_queued_and_running_jobs(repo: Repository, conversation_id: int) -> None:
    _, running, _ = await enqueue(repo, conversation_id, "1")
    _, queued, _ = await enqueue(repo, conversation_id, "2")
    other = await repo.get_or_create_conversation(ConversationKey("discord", "other"), is_direct=False)
    _, elsewhere, _ = await enqueue(repo, other.id, "1")
    assert running is not None and queued is not None and elsewhere is not None
    assert await repo.mark_running(running.id, [])
    await repo.set_system_prompt(conversation_id, "old")

    archived, cancelled = await repo.reset_conversation(conversation_id)
    assert (archived, sorted(cancelled)) == (2, [running.id, queued.id])
    assert await repo.history(conversation_id) == []
    assert (await repo.get_conversation(conversation_id)).system_prompt == "old"  # type: ignore[union-attr]
    # The running job's cancellation is stored: whichever process runs it stops (and stores nothing).
    assert await repo.pending_jobs_for(conversation_id) == []
    assert (await repo.get_job(queued.id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert (await repo.get_job(running.id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    assert [j.id for j in await repo.pending_jobs_for(other.id)] == [elsewhere.id]
    assert len(await repo.history(other.id)) == 1

    # Nothing is lost: the archived rows are still there, and the same platform ids stay deduplicated.
    _, created = await repo.record_message(conversation_id, role=Role.USER, **ALICE, text="x", platform_message_id="1")
    assert created is False

    await repo.record_message(conversation_id, role=Role.USER, **ALICE, text="new", platform_message_id="3")
    assert await repo.reset_conversation(conversation_id, system_prompt="fresh") == (1, [])
    assert (await repo.get_conversation(conversation_id)).system_prompt == "fresh"  # type: ignore[union-attr]
    assert await repo.reset_conversation(conversation_id, system_prompt=None) == (0, [])
    assert (await repo.get_conversation(conversation_id)).system_prompt is None  # type: ignore[union-attr]
    assert await repo.reset_conversation(conversation_id, system_prompt=UNCHANGED) == (0, [])
    with pytest.raises(RecordNotFound):
        await repo.reset_conversation(999)


async def test_requeue_interrupted(db_path: Path) -> None:
    async with Database(sqlite_url(db_path)) as database:
        repo = Repository(database.sessions)
        conversations = [
            (await repo.get_or_create_conversation(ConversationKey("console", f"c{i}"), is_direct=True)).id for i in range(3)
        ]
        jobs = [(await enqueue(repo, conversations[i], str(i)))[1] for i in range(3)]
        assert await repo.mark_running(jobs[0].id, [{"role": "user", "content": "0"}])
        assert await repo.mark_running(jobs[1].id, [])
        assert await repo.requeue_job(jobs[1].id, "worker died") == 1
        assert await repo.mark_running(jobs[1].id, [])
        # ... and the process crashes here.
    async with Database(sqlite_url(db_path)) as database:
        repo = Repository(database.sessions)
        assert await repo.requeue_interrupted() == 2
        assert await repo.requeue_interrupted() == 0
        queued = await repo.queued_jobs()
        assert [j.id for j in queued] == [j.id for j in jobs]
        assert [j.attempts for j in queued] == [0, 1, 0]
        assert all(j.started_at is None for j in queued)
        assert await running_jobs(repo) == []


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_enqueues_with_distinct_ids_all_land(repo: Repository, conversation_id: int) -> None:
    results = await asyncio.gather(*(enqueue(repo, conversation_id, f"m{i}") for i in range(20)))
    assert all(created for _, _, created in results)
    assert len({m.id for m, _, _ in results}) == 20
    assert len({j.id for _, j, _ in results if j is not None}) == 20
    assert len(await repo.history(conversation_id)) == 20
    assert await repo.pending_count(conversation_id) == 20


async def test_concurrent_enqueues_with_the_same_id_land_once(repo: Repository, conversation_id: int) -> None:
    results = await asyncio.gather(*(enqueue(repo, conversation_id, "same") for _ in range(20)))
    assert sum(created for _, _, created in results) == 1
    assert len({m.id for m, _, _ in results}) == 1
    assert len({j.id for _, j, _ in results if j is not None}) == 1
    assert all(j is not None for _, j, _ in results)
    assert len(await repo.history(conversation_id)) == 1
    assert len(await repo.queued_jobs()) == 1


async def test_concurrent_enqueues_respect_the_limit_exactly(repo: Repository, conversation_id: int) -> None:
    outcomes = await asyncio.gather(
        *(enqueue(repo, conversation_id, f"m{i}", max_pending=100, max_pending_per_conversation=4) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, QueueFull) for o in outcomes) == 16
    assert sum(isinstance(o, tuple) for o in outcomes) == 4
    assert await repo.pending_count(conversation_id) == 4
    assert len(await repo.history(conversation_id)) == 20  # every message kept


async def test_in_memory_database_serializes_concurrent_sessions() -> None:
    async with Database("sqlite+aiosqlite://") as database:
        repo = Repository(database.sessions)
        conversation = await repo.get_or_create_conversation(ConversationKey("console", "m"), is_direct=True)
        results = await asyncio.gather(*(enqueue(repo, conversation.id, f"m{i}") for i in range(10)))
        assert len({j.id for _, j, _ in results if j is not None}) == 10


async def test_concurrent_read_then_write_transactions_do_not_hit_locked_errors(
    repo: Repository, conversation_id: int
) -> None:
    # finish_job and set_generation read before they write; on SQLite a plain deferred BEGIN would
    # fail them with "database is locked" when another writer commits in between.
    # Ten running jobs need ten conversations: the claim refuses a second running job in one.
    others = [(await repo.get_or_create_conversation(ConversationKey("discord", f"c{i}"), is_direct=False)).id for i in range(10)]
    jobs = [(await enqueue(repo, others[i], f"q{i}"))[1] for i in range(10)]
    for job in jobs:
        assert job is not None and await repo.mark_running(job.id, [])
    await asyncio.gather(
        *(
            repo.finish_job(job.id, reply_text="ok", author_id="bot", author_name="P", platform_message_id=f"r{job.id}")
            for job in jobs
            if job is not None
        ),
        *(repo.set_generation(conversation_id, temperature=i / 10) for i in range(10)),
        *(enqueue(repo, conversation_id, f"n{i}") for i in range(10)),
    )
    assert await repo.pending_count(conversation_id) == 10
    assert len(await repo.history(conversation_id)) == 10
    assert [len(await repo.history(other)) for other in others] == [2] * 10


async def test_a_folder_in_place_of_the_database_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot create the database file|cannot open or migrate database") as caught:
        await Database(sqlite_url(tmp_path)).start()
    assert str(tmp_path) in str(caught.value)


async def test_upgrade_database_works_from_inside_a_running_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"
    assert upgrade_database(f"sqlite:///{path}") == head_revision()  # plain sqlite:// gets the async driver
    assert TABLES <= table_names(path)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2", "3", "4", None])), max_size=12))
def test_history_is_first_delivery_order_without_duplicates(deliveries: list[tuple[str, str | None]]) -> None:
    async def scenario(path: Path) -> None:
        async with Database(sqlite_url(path)) as database:
            repo = Repository(database.sessions)
            ids = {
                name: (await repo.get_or_create_conversation(ConversationKey("discord", name), is_direct=False)).id
                for name in ("a", "b")
            }
            expected: dict[str, list[str | None]] = {"a": [], "b": []}
            for i, (name, platform_id) in enumerate(deliveries):
                _, created = await repo.record_message(
                    ids[name], role=Role.USER, **ALICE, text=f"{i}", platform_message_id=platform_id
                )
                assert created == (platform_id is None or platform_id not in expected[name])
                if created:
                    expected[name].append(platform_id)
            for name, conversation in ids.items():
                assert [m.platform_message_id for m in await repo.history(conversation)] == expected[name]

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(scenario(Path(folder) / "parley.db"))


async def test_the_database_file_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "private" / "parley.db"
    async with Database(f"sqlite+aiosqlite:///{path}"):
        pass
    assert path.stat().st_mode & 0o777 == 0o600


# -- handled updates: a change, its audit row and the record of its update are one transaction ------


async def test_an_admin_change_its_audit_row_and_its_update_are_one_transaction(
    repo: Repository, conversation_id: int
) -> None:
    from bot.core.errors import UpdateAlreadyHandled
    from storage import HandledUpdate

    def update(update_id: str, **actor: Any) -> HandledUpdate:
        return HandledUpdate("discord", "123", update_id, **({"actor_id": "u1", "actor_name": "Alice"} | actor))

    _, first, _ = await enqueue(repo, conversation_id, "1")
    assert await repo.reset_conversation(conversation_id, handled=update("reset")) == (1, [first.id])
    _, later, _ = await enqueue(repo, conversation_id, "2")
    with pytest.raises(UpdateAlreadyHandled):  # delivered again: nothing happens
        await repo.reset_conversation(conversation_id, handled=update("reset"))
    assert [m.text for m in await repo.history(conversation_id)] == ["hello 2"]
    assert [j.id for j in await repo.pending_jobs_for(conversation_id)] == [later.id]

    assert (await repo.set_system_prompt(conversation_id, "Be terse.", handled=update("system"))).system_prompt == "Be terse."
    with pytest.raises(UpdateAlreadyHandled):
        await repo.set_system_prompt(conversation_id, "Be loud.", handled=update("system"))
    await repo.set_generation(conversation_id, temperature=0.5, handled=update("set"))
    with pytest.raises(UpdateAlreadyHandled):
        await repo.set_generation(conversation_id, temperature=1.5, handled=update("set"))
    assert await repo.forget_author(conversation_id, "u1", handled=update("forget")) == (1, [later.id])
    with pytest.raises(UpdateAlreadyHandled):
        await repo.forget_author(conversation_id, "u1", handled=update("forget"))
    stored = await repo.get_conversation(conversation_id)
    assert (stored.system_prompt, stored.temperature) == ("Be terse.", 0.5)  # type: ignore[union-attr]
    assert [(e.action, e.actor_name, e.detail) for e in await repo.audit_log(conversation_id)] == [
        ("reset", "Alice", "archived=1 cancelled=1"),
        ("system", "Alice", "'Be terse.'"),
        ("set", "Alice", "temperature=0.5"),
        ("forget", "Alice", "archived=1 cancelled=1"),
    ]

    # A change that fails leaves no trace: not the change, not its audit row, not its update.
    with pytest.raises(RecordNotFound):
        await repo.reset_conversation(999, handled=update("missing"))
    assert not await repo.was_handled(update("missing"))
    with pytest.raises(StorageError):  # the audit row cannot be written (no actor name)
        await repo.set_system_prompt(conversation_id, "never", handled=update("broken", actor_name=None))
    assert (await repo.get_conversation(conversation_id)).system_prompt == "Be terse."  # type: ignore[union-attr]
    assert not await repo.was_handled(update("broken", actor_name=None))
    assert len(await repo.audit_log(conversation_id)) == 4

    # Through layers that know nothing of updates (the job queue), the update being handled is the
    # one `handling` names.
    with repo.handling(update("ambient")):
        await repo.reset_conversation(conversation_id)
        with pytest.raises(UpdateAlreadyHandled):
            await repo.set_system_prompt(conversation_id, "twice")
    assert (await repo.audit_log(conversation_id))[-1].action == "reset"
    await repo.reset_conversation(conversation_id)  # outside: no update, no audit row
    assert len(await repo.audit_log(conversation_id)) == 5


async def test_marking_an_update_handled_is_race_safe_and_pruned(repo: Repository) -> None:
    from datetime import timedelta

    from storage import HandledUpdate

    update = HandledUpdate("telegram", "42", "7")
    results = await asyncio.gather(*(repo.mark_handled(update) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert await repo.was_handled(update)
    assert not await repo.was_handled(HandledUpdate("telegram", "43", "7"))  # per conversation
    assert not await repo.was_handled(HandledUpdate("discord", "42", "7"))  # per platform
    assert await repo.prune_handled_updates(older_than=timedelta(days=1)) == 0
    assert await repo.prune_handled_updates(older_than=timedelta(seconds=-1)) == 1
    assert not await repo.was_handled(update)


async def test_an_unavailable_database_is_its_own_error(sqlite_only: None, db_path: Path, monkeypatch) -> None:
    from bot.core.errors import StorageUnavailable
    from storage.db import create_engine
    from sqlalchemy.ext.asyncio import async_sessionmaker

    monkeypatch.setattr("storage.db.SQLITE_BUSY_TIMEOUT_MS", 100)
    async with Database(sqlite_url(db_path)) as database:
        repo = Repository(database.sessions)
        lock = sqlite3.connect(db_path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
        try:
            with pytest.raises(StorageUnavailable, match="locked"):
                await repo.get_or_create_conversation(ConversationKey("discord", "1"), is_direct=False)
        finally:
            lock.rollback()
            lock.close()
        await repo.get_or_create_conversation(ConversationKey("discord", "1"), is_direct=False)
        with pytest.raises(RecordNotFound) as not_found:  # a missing row is no outage
            await repo.set_system_prompt(999, "x")
        assert not isinstance(not_found.value, StorageUnavailable)
    # A PostgreSQL server that is down.
    engine = create_engine("postgresql+asyncpg://bob:pw@127.0.0.1:1/parley")
    try:
        repo = Repository(async_sessionmaker(engine, expire_on_commit=False))
        with pytest.raises(StorageUnavailable):
            await repo.find_conversation(ConversationKey("discord", "1"))
    finally:
        await engine.dispose()

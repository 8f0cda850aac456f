"""Several bot processes on one database: claiming jobs and requeueing interrupted ones.

Each test runs on PostgreSQL (a throwaway server, see tests/pg_server.py; skipped, saying why,
where none can be had) and on SQLite. Two `Database`s (two engines and connection pools) with two
`Repository`s of different owners stand for two bot processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text, update

from bot.core.types import ConversationKey, JobStatus
from storage import Database, Job, Repository, alembic_config, default_owner, head_revision, upgrade_database
from storage.models import utcnow
from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.support import running_jobs

JOBS = 50
BIG = {"max_pending": 1000, "max_pending_per_conversation": 1000}


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite+aiosqlite:///{tmp_path}/parley.db"


@pytest.fixture
async def two_processes(url: str) -> Any:
    """(database, repo) twice on one database, with owners "process-a" and "process-b"."""
    first, second = Database(url), Database(url)
    await first.start()
    await second.start()
    try:
        yield (first, Repository(first.sessions, owner="process-a")), (second, Repository(second.sessions, owner="process-b"))
    finally:
        await first.stop()
        await second.stop()


async def queue_jobs(repo: Repository, count: int, conversations: int = 5, platform: str = "discord") -> list[int]:
    ids = []
    for i in range(count):
        conversation = await repo.get_or_create_conversation(ConversationKey(platform, str(i % conversations)), is_direct=False)
        _, job, _ = await repo.record_and_enqueue(
            conversation.id, author_id="u1", author_name="Alice", text=f"q{i}", platform_message_id=f"m{i}", **BIG
        )
        assert job is not None
        ids.append(job.id)
    return ids


async def test_two_processes_marking_running_never_run_a_job_twice(two_processes: Any) -> None:
    (_, a), (_, b) = two_processes
    ids = await queue_jobs(a, JOBS, conversations=JOBS)  # one running job per conversation: one job each

    async def claimer(repo: Repository) -> list[int]:
        # What the queue does: read the queued jobs, then claim each with mark_running.
        won = []
        for job in await repo.queued_jobs():
            if await repo.mark_running(job.id, [{"role": "user", "content": str(job.id)}]):
                won.append(job.id)
            await asyncio.sleep(0)
        return won

    won_a, won_b = await asyncio.gather(claimer(a), claimer(b))
    claims = Counter(won_a + won_b)
    assert sorted(claims) == ids and set(claims.values()) == {1}  # every job claimed exactly once
    for job_id in ids:
        job = await a.get_job(job_id)
        assert job is not None and job.status is JobStatus.RUNNING
        assert job.owner == ("process-a" if job_id in won_a else "process-b") and job.heartbeat_at is not None




async def test_two_processes_never_run_two_jobs_of_one_conversation(two_processes: Any) -> None:
    (_, a), (_, b) = two_processes
    ids = await queue_jobs(a, 20, conversations=2)  # even ids: conversation 0, odd: conversation 1
    claims = await asyncio.gather(*(repo.mark_running(job_id, []) for job_id in ids for repo in (a, b)))
    assert sum(claims) == 2  # one per conversation, by whichever process got there first
    running = await running_jobs(a)
    assert sorted(job.conversation_id for job in running) == sorted({job.conversation_id for job in running})
    assert len(running) == 2
    # Once the running one ends, the conversation's next job may be claimed (by either process).
    for job in running:
        assert await (a if job.owner == "process-a" else b).fail_job(job.id, "done with it")
    queued = {job.conversation_id: job.id for job in reversed(await a.queued_jobs())}  # the oldest of each
    first, second = sorted(queued.values())
    assert await b.mark_running(first, []) and await a.mark_running(second, [])
    assert not any([await a.mark_running(job.id, []) for job in await a.queued_jobs()])


async def test_requeue_interrupted_leaves_a_live_owners_jobs_alone(two_processes: Any) -> None:
    (database, a), (_, b) = two_processes
    ids = await queue_jobs(a, 6, conversations=6)
    for job_id in ids[:3]:
        assert await a.mark_running(job_id, [])
    for job_id in ids[3:]:
        assert await b.mark_running(job_id, [])

    # Process a restarts (same owner: its previous life); b is alive and heartbeating.
    assert await b.heartbeat() == 3
    assert await a.requeue_interrupted() == 3
    assert [j.id for j in await a.queued_jobs()] == ids[:3]
    assert [j.id for j in await running_jobs(a)] == ids[3:]
    assert all(j.owner == "process-b" for j in await running_jobs(a))
    assert all(j.owner is None and j.heartbeat_at is None for j in await a.queued_jobs())

    # b stops heartbeating (hung or on a machine that went away): past stale_after, a takes over.
    async with database.sessions() as session, session.begin():
        await session.execute(update(Job).where(Job.owner == "process-b").values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    assert await a.requeue_interrupted(stale_after=timedelta(minutes=10)) == 0
    assert await b.mark_running(ids[0], [])  # b's own, fresh
    assert await b.requeue_interrupted(stale_after=60, own_jobs=False) == 0  # b's periodic sweep: not its own
    assert await a.requeue_interrupted(stale_after=60, own_jobs=False) == 3  # a's sweep takes b's stale ones
    assert [j.id for j in await running_jobs(a)] == [ids[0]]
    assert await a.requeue_interrupted("process-b") == 1
    assert await running_jobs(a) == []


async def test_requeue_interrupted_takes_a_dead_local_process_jobs(two_processes: Any) -> None:
    (_, a), (database, _) = two_processes
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    host, namespace, _pid, _random = default_owner().split(":")
    dead = Repository(database.sessions, owner=f"{host}:{namespace}:{int(gone.stdout)}:1f2e3d4c")
    alive = Repository(database.sessions, owner=f"{host}:{namespace}:1:5a6b7c8d")  # pid 1 always exists
    elsewhere = Repository(database.sessions, owner="another-host:4026531836:1234:9e8d7c6b")
    ids = await queue_jobs(a, 3)
    for repo, job_id in zip((dead, alive, elsewhere), ids, strict=True):
        assert await repo.mark_running(job_id, [])

    assert await a.requeue_interrupted() == 1  # the dead one only; the others heartbeat recently
    assert [j.id for j in await a.queued_jobs()] == [ids[0]]
    assert await a.requeue_interrupted(stale_after=None) == 0


async def test_heartbeat_touches_only_the_owners_running_jobs(two_processes: Any) -> None:
    (_, a), (_, b) = two_processes
    ids = await queue_jobs(a, 3)
    assert await a.mark_running(ids[0], []) and await b.mark_running(ids[1], [])
    before = {job.id: job.heartbeat_at for job in await running_jobs(a)}
    await asyncio.sleep(0.05)
    assert await a.heartbeat() == 1
    after = {job.id: job.heartbeat_at for job in await running_jobs(a)}
    assert after[ids[0]] > before[ids[0]] and after[ids[1]] == before[ids[1]]
    assert await a.heartbeat("process-b") == 1 and await a.heartbeat("nobody") == 0
    assert await a.requeue_job(ids[0], "worker died") == 1  # back in the queue: no owner any more
    job = await a.get_job(ids[0])
    assert job is not None and job.owner is None and job.heartbeat_at is None


def test_migrations_downgrade_and_upgrade_again(url: str) -> None:
    assert upgrade_database(url) == head_revision()
    config = alembic_config(url)
    command.downgrade(config, "0002")
    command.downgrade(config, "base")
    command.upgrade(config, "head")

    async def columns() -> set[str]:
        async with Database(url) as database, database.engine.connect() as conn:
            revision = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            assert revision == head_revision()
            return set(await conn.run_sync(lambda sync: {c["name"] for c in inspect(sync).get_columns("jobs")}))

    assert {"owner", "heartbeat_at", "reply_platform_ids", "prompt"} <= asyncio.run(columns())


BOT_PROCESS = """
import asyncio, json, sys
from adapters.fake import FakeAdapter
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from tests.support import make_settings
from pathlib import Path

async def main(model, url, out, go):
    settings = make_settings(Path(model), Path(out).parent)
    settings = settings.with_overrides(storage=type(settings.storage)(url=url))
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        while not Path(go).exists():  # both processes start dispatching together
            await asyncio.sleep(0.05)
        for _ in range(600):
            if await app.repo.pending_count() == 0 and not app.queue._tasks:
                break
            await asyncio.sleep(0.1)
        Path(out).write_text(json.dumps(sorted(r.reply_to for r in fake.replies if r.text)))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_bot_processes_on_one_database_never_answer_a_message_twice(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two real OS processes, each a whole Parley (queue, worker engine, storage), share the database."""
    async with Database(url) as database:
        repo = Repository(database.sessions, owner="producer")
        await queue_jobs(repo, 24, conversations=8, platform="fake")  # FakeAdapter's platform
    go = tmp_path / "go"
    outs = [tmp_path / f"answered-{n}.json" for n in range(2)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", BOT_PROCESS, str(tiny_model_dir), url, str(out), str(go),
            cwd=Path(__file__).resolve().parent.parent, stderr=asyncio.subprocess.PIPE,
        )
        for out in outs
    ]
    await asyncio.sleep(3.0)  # let both load the model
    go.touch()
    results = await asyncio.gather(*(asyncio.wait_for(p.communicate(), 300) for p in processes))
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr.decode()[-3000:]
    import json

    answered = [json.loads(out.read_text()) for out in outs]
    counts = Counter(message for process in answered for message in process)
    assert sorted(counts) == sorted(f"m{i}" for i in range(24))  # every message answered...
    assert set(counts.values()) == {1}  # ...exactly once, across both processes

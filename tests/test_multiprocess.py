"""Several bot processes on one database keep the guarantees of one (issue 12).

Each test runs two complete Parley apps (router, queue, in-process tiny model, storage) on one
database, standing for two bot processes: on PostgreSQL (a throwaway server, tests/pg_server.py)
and, where it means something, on SQLite. What must hold across processes lives in the database:
the one running job per conversation (the claim), cancellation, the state a waiter waits on, and
the ownership of a running job.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.fake import FakeAdapter, FakeReply
from bot.conversation import messages
from bot.core.contracts import Outcome, ReplyStream
from bot.core.errors import StorageUnavailable
from bot.core.types import ConversationKey, JobStatus, Role
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from storage import Database, Job, Message, Repository, default_owner
from tests import pg_server
from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.support import make_settings

FINAL = {JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED}


class _HeldStream(ReplyStream):
    """Shows text only once released: the reply stays `running` for as long as the test likes."""

    def __init__(self, adapter: HeldAdapter, reply: FakeReply) -> None:
        self.adapter, self.reply = adapter, reply

    async def update(self, text: str) -> None:
        first = not self.reply.updates
        self.reply.updates.append(text)
        if first:
            await self.report_posted()
        self.adapter.shown.set()
        await self.adapter.release.wait()

    async def finish(self, text: str) -> list[str]:
        self.reply.text = text
        return [self.reply.message_id]

    async def fail(self, notice: str) -> None:
        self.reply.failed = notice

    @property
    def posted_ids(self) -> list[str]:
        return [self.reply.message_id] if self.reply.updates or self.reply.done else []


class HeldAdapter(FakeAdapter):
    """The "fake" platform of one process; its reply ids say which process posted them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.release = asyncio.Event()
        self.shown = asyncio.Event()

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()) -> ReplyStream:
        reply = FakeReply(conversation, reply_to, message_id=f"{self.name}-bot-{len(self.replies) + 1}")
        self.replies.append(reply)
        return _HeldStream(self, reply)


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite+aiosqlite:///{tmp_path}/parley.db"


@pytest.fixture
def postgresql_url(postgres_url: str) -> str:  # noqa: F811
    return postgres_url


@contextlib.asynccontextmanager
async def two_apps(url: str, model_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[tuple[ParleyApp, HeldAdapter], ...]]:
    """Two whole Parleys ("a" and "b") on one database, each with its own platform adapter."""
    settings = make_settings(model_dir, tmp_path, generation={"max_new_tokens": 48})
    settings = settings.with_overrides(storage=type(settings.storage)(url=url))
    async with contextlib.AsyncExitStack() as stack:
        pairs = []
        for name in ("a", "b"):  # one after the other: the first start migrates the database
            adapter = HeldAdapter(name)
            app = ParleyApp(settings, [adapter], client=make_generation_client(settings, in_process=True))
            await stack.enter_async_context(app)
            pairs.append((app, adapter))
        try:
            yield tuple(pairs)
        finally:
            for _, adapter in pairs:
                adapter.release.set()  # nothing stays held while the apps stop


async def stored_job(app: ParleyApp, job_id: int) -> Job:
    async with app.database.sessions() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return job


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def until_final(app: ParleyApp, job_ids: Sequence[int], timeout: float = 30.0) -> list[Job]:
    async def ended() -> bool:
        return all([(await stored_job(app, job_id)).status in FINAL for job_id in job_ids])

    await until(ended, timeout, f"jobs {list(job_ids)} to end")
    return [await stored_job(app, job_id) for job_id in job_ids]


async def assistant_messages(app: ParleyApp, conversation: ConversationKey) -> list[Message]:
    found = await app.repo.find_conversation(conversation)
    assert found is not None
    async with app.database.sessions() as session:
        query = select(Message).where(Message.conversation_id == found.id, Message.role == Role.ASSISTANT)
        return list((await session.scalars(query.order_by(Message.id))).all())


ROOM = ConversationKey("fake", "room")


# -- 1. one running job per conversation, checked by the claim ----------------------------------


async def test_a_conversation_never_has_two_running_jobs_across_processes(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    async with two_apps(url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        first = await fa.say("what is one plus one?", chat="room", message_id="q1")
        assert first.outcome is Outcome.QUEUED
        await asyncio.wait_for(fa.shown.wait(), 30)  # a writes the first answer...
        second = await fb.say("and two plus two?", chat="room", message_id="q2")  # ...as b is asked the next
        assert second.outcome is Outcome.QUEUED
        conversation_id = (await stored_job(a, first.job_id)).conversation_id
        for _ in range(20):  # b's dispatcher had its chance: it must not start the second reply
            async with a.database.sessions() as session:
                running = (await session.scalars(
                    select(Job.id).where(Job.conversation_id == conversation_id, Job.status == JobStatus.RUNNING)
                )).all()
            assert list(running) == [first.job_id]
            await asyncio.sleep(0.1)
        fa.release.set()
        fb.release.set()
        done_first, done_second = await until_final(a, [first.job_id, second.job_id])
        assert done_first.status is JobStatus.DONE and done_second.status is JobStatus.DONE
        answer = await a.repo.get_message(done_first.reply_message_id)
        assert answer is not None
        # The second reply was written knowing the first answer.
        assert {"role": "assistant", "content": answer.text} in done_second.prompt


# -- 2. /reset in one process stops the reply running in another --------------------------------


async def test_reset_in_one_process_stops_a_reply_running_in_another(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    async with two_apps(url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        asked = await fa.say("tell me a long story", chat="room", message_id="q1")
        await asyncio.wait_for(fa.shown.wait(), 30)
        reset = await fb.say("/reset", chat="room", admin=True, message_id="r1")
        assert reset.outcome is Outcome.COMMAND
        assert (await stored_job(b, asked.job_id)).status is JobStatus.CANCELLED  # stored with the job
        await asyncio.sleep(1.2)  # every process notices within a second
        assert asked.job_id in a.queue.attempts.cancelled_jobs
        fa.release.set()
        (job,) = await until_final(a, [asked.job_id])
        assert job.status is JobStatus.CANCELLED
        assert await a.queue.wait_for(asked.job_id) == JobStatus.CANCELLED.value  # a's attempt ended
        (shown,) = fa.replies
        assert (shown.text or shown.failed or "").endswith(messages.STOPPED)
        assert await assistant_messages(a, ROOM) == []  # the reply was not stored, not even archived
        assert (await stored_job(a, asked.job_id)).reply_message_id is None


async def test_forget_in_one_process_stops_the_authors_reply_in_another(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    async with two_apps(url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        asked = await fa.say("my secret is 42", chat="room", user="ann", message_id="q1")
        await asyncio.wait_for(fa.shown.wait(), 30)
        await fb.say("/forget", chat="room", user="ann", message_id="f1")
        await asyncio.sleep(1.2)
        fa.release.set()
        (job,) = await until_final(a, [asked.job_id])
        assert job.status is JobStatus.CANCELLED
        assert await assistant_messages(a, ROOM) == []


# -- 3. waiting is on the stored state --------------------------------------------------------------


async def test_a_wait_ends_when_another_process_finishes_the_job(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    async with two_apps(url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        asked = await fb.say("hello there", chat="room", message_id="q1")  # b answers it
        await asyncio.wait_for(fb.shown.wait(), 30)
        waiting = asyncio.create_task(a.router.wait_for(asked.job_id))  # a waits on it
        await asyncio.sleep(0.3)
        assert not waiting.done()
        fb.release.set()
        assert await asyncio.wait_for(waiting, 5) == JobStatus.DONE.value
        assert not a.queue._waiters  # nothing of the wait is left behind


# -- 4. the heartbeat survives a database restart; a stale owner stores nothing -----------------


async def test_heartbeat_survives_a_database_restart_and_a_stale_owner_stores_nothing(
    postgresql_url: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pg_server.can_restart():
        pytest.skip("needs a PostgreSQL server started by the tests (not PARLEY_TEST_POSTGRES_URL) to restart it")
    monkeypatch.setattr("storage.base.HEARTBEAT_INTERVAL", timedelta(seconds=0.3))
    async with two_apps(postgresql_url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        asked = await fa.say("tell me about databases", chat="room", message_id="q1")
        await asyncio.wait_for(fa.shown.wait(), 30)
        await asyncio.to_thread(pg_server.stop_server)
        try:
            await asyncio.sleep(1.5)  # heartbeats (and polls) meet a server that is down
        finally:
            await asyncio.to_thread(pg_server.start_server)

        async def read_job() -> Job:
            for _ in range(50):  # the pools' old connections are dead: the first uses may fail
                try:
                    return await b.repo.get_job(asked.job_id)  # type: ignore[return-value]
                except StorageUnavailable:
                    await asyncio.sleep(0.1)
            raise AssertionError("the database did not come back")

        restarted = (await read_job()).heartbeat_at

        async def beaten() -> bool:
            return (await read_job()).heartbeat_at > restarted

        await until(beaten, 10, "a heartbeat after the database restart")
        assert a.queue._heartbeat is not None and not a.queue._heartbeat.done()

        # a is now a stale owner: a sibling took its job over (as after 90 s without heartbeats)
        # and runs it; a's attempt, still writing, must stop and store nothing.
        assert await b.repo.requeue_interrupted(a.repo.owner) == 1
        b.queue._wake.set()

        async def taken_over() -> bool:
            job = await stored_job(b, asked.job_id)
            return job.status is JobStatus.RUNNING and job.owner == b.repo.owner

        await until(taken_over, 10, "b to take the job over")
        await asyncio.sleep(1.2)
        fa.release.set()
        await asyncio.sleep(0.5)
        fb.release.set()
        (job,) = await until_final(b, [asked.job_id])
        assert job.status is JobStatus.DONE
        replies = await assistant_messages(b, ROOM)
        assert [m.platform_message_id.split("-")[0] for m in replies] == ["b"]  # b's answer only
        assert not (fa.replies and fa.replies[0].text)  # a stopped: its reply was never finished


# -- 5. a job whose finishing failed twice is not stranded -------------------------------------------


async def test_a_job_whose_finish_and_fail_both_failed_is_queued_again(url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    async with two_apps(url, tiny_model_dir, tmp_path) as ((a, fa), (b, fb)):
        fa.release.set()
        fb.release.set()
        outage: dict[str, int] = {}

        def flaky(name: str) -> None:
            real = getattr(a.repo, name)

            async def once_down(*args: Any, **kwargs: Any) -> Any:
                outage[name] = outage.get(name, 0) + 1
                if outage[name] == 1:
                    raise StorageUnavailable("database error: the server is restarting (test)")
                return await real(*args, **kwargs)

            setattr(a.repo, name, once_down)

        flaky("finish_job")
        flaky("fail_job")
        asked = await fa.say("hello", chat="room", message_id="q1")
        assert await asyncio.wait_for(a.router.wait_for(asked.job_id), 15) == JobStatus.DONE.value
        assert outage["finish_job"] >= 2 and outage["fail_job"] == 1
        assert await a.repo.pending_count() == 0  # the user's slot is free
        assert len(await assistant_messages(a, ROOM)) == 1
        assert fa.replies and fa.replies[-1].text


# -- 8. owner ids ------------------------------------------------------------------------------------


async def test_every_start_has_its_own_owner_id_and_a_dead_previous_life_is_requeued(url: str) -> None:
    async with Database(url) as database:
        first, second = Repository(database.sessions), Repository(database.sessions)
        assert first.owner != second.owner  # same host, same pid, two starts
        assert default_owner("bot-eu").startswith("bot-eu@")
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        host, namespace, _pid, _random = default_owner().split(":")
        dead = Repository(database.sessions, owner=f"named@{host}:{namespace}:{int(gone.stdout)}:0a1b2c3d")
        conversation = await first.get_or_create_conversation(ROOM, is_direct=False)
        _, job, _ = await first.record_and_enqueue(
            conversation.id, author_id="u", author_name="U", text="q", platform_message_id="1",
            max_pending=10, max_pending_per_conversation=10,
        )
        assert job is not None and await dead.mark_running(job.id, [])
        assert await second.requeue_interrupted() == 1  # its process is gone: queued again at start-up


class _ServerStartingUp:
    """A session factory whose connection attempt fails as asyncpg's does while a server starts."""

    def __call__(self) -> _ServerStartingUp:
        return self

    async def __aenter__(self) -> Any:
        asyncpg = pytest.importorskip("asyncpg")
        raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_driver_errors_are_storage_errors_and_the_heartbeat_outlives_any_error(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Repository(_ServerStartingUp(), owner="x")  # type: ignore[arg-type]
    with pytest.raises(StorageUnavailable, match="CannotConnectNowError"):
        await repo.heartbeat()

    monkeypatch.setattr("storage.base.HEARTBEAT_INTERVAL", timedelta(seconds=0.1))
    settings = make_settings(tiny_model_dir, tmp_path)
    async with ParleyApp(settings, [FakeAdapter()], client=make_generation_client(settings, in_process=True)) as app:
        beats: list[int] = []
        real = app.repo.heartbeat

        async def unlucky(owner: str | None = None) -> int:
            beats.append(1)
            if len(beats) == 1:
                raise ConnectionResetError("connection reset by peer (a driver error nobody wrapped)")
            return await real(owner)

        app.repo.heartbeat = unlucky  # type: ignore[method-assign]
        await until(lambda: asyncio.sleep(0, len(beats) >= 4), 5, "the heartbeat to go on after an error")
        assert app.queue._heartbeat is not None and not app.queue._heartbeat.done()

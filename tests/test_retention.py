"""The retention sweep (`[storage] keep_days`): what is older goes, in bounded batches, and nothing
newer; on SQLite and on PostgreSQL (the fixtures of tests/test_storage.py)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select

from bot.core.types import ConversationKey, JobStatus, Role
from storage import Job, Message, Repository
from storage.models import utcnow
from storage.retention import RetentionSweeper
from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.test_storage import database, database_url, db_path, repo  # noqa: F401  (fixtures)

DAY = timedelta(days=1)


async def seed(repo: Repository) -> dict[str, set[int]]:
    """Rows on both sides of a 30-day cut; returns the ids that must go and those that must stay."""
    conversation = await repo.get_or_create_conversation(ConversationKey("telegram", "7"), is_direct=False)
    now = utcnow()
    old, recent = now - 40 * DAY, now - 29 * DAY
    go = {"jobs": set(), "messages": set()}
    stay = {"jobs": set(), "messages": set()}
    async with repo._sessions() as session, session.begin():
        def message(created, archived, role=Role.USER):  # noqa: ANN001, ANN202
            row = Message(conversation_id=conversation.id, role=role, author_id="u", author_name="U",
                          text="t", created_at=created, archived=archived)
            session.add(row)
            return row

        rows = {
            "old archived": [message(old, True) for _ in range(7)],
            "recent archived": [message(recent, True) for _ in range(2)],
            "old live": [message(old, False) for _ in range(2)],
        }
        answered = [(message(old, True), message(old, True, Role.ASSISTANT)) for _ in range(4)]
        waiting = message(old, True)  # archived, but a queued job still points at it
        recent_question = message(recent, True)
        await session.flush()
        jobs = {
            "old finished": [
                Job(conversation_id=conversation.id, message_id=q.id, reply_message_id=a.id, status=status,
                    created_at=old, finished_at=old)
                for (q, a), status in zip(answered, [JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DONE])
            ],
            "old queued": [Job(conversation_id=conversation.id, message_id=waiting.id, status=JobStatus.QUEUED, created_at=old)],
            "recent done": [Job(conversation_id=conversation.id, message_id=recent_question.id, status=JobStatus.DONE,
                                created_at=recent, finished_at=recent)],
        }
        session.add_all([job for group in jobs.values() for job in group])
        await session.flush()
        go["messages"] = {m.id for m in rows["old archived"]} | {m.id for pair in answered for m in pair}
        go["jobs"] = {j.id for j in jobs["old finished"]}
        stay["messages"] = {m.id for m in rows["recent archived"] + rows["old live"] + [waiting, recent_question]}
        stay["jobs"] = {j.id for j in jobs["old queued"] + jobs["recent done"]}
    return {"go_jobs": go["jobs"], "go_messages": go["messages"], "stay_jobs": stay["jobs"], "stay_messages": stay["messages"]}


async def ids(repo: Repository, model: type) -> set[int]:
    async with repo._sessions() as session:
        return set((await session.scalars(select(model.id))).all())


async def test_the_sweep_deletes_what_is_older_and_nothing_newer_in_batches(repo: Repository):
    expected = await seed(repo)
    assert len(expected["go_jobs"]) == 4 and len(expected["go_messages"]) == 15
    report = await repo.sweep_older_than(30 * DAY, batch_size=3, pause=0)
    assert (report.jobs, report.messages) == (4, 15)
    assert report.batches == 2 + 5  # ceil(4 / 3) batches of jobs, 15 / 3 of messages
    assert await ids(repo, Job) == expected["stay_jobs"]
    assert await ids(repo, Message) == expected["stay_messages"]
    again = await repo.sweep_older_than(30 * DAY, batch_size=3, pause=0)
    assert (again.jobs, again.messages, again.batches) == (0, 0, 0)


async def test_the_sweeper_runs_soon_after_start_then_daily(repo: Repository):
    expected = await seed(repo)
    sweeper = RetentionSweeper(repo, keep_days=30, first_after=0.01, every=3600)
    await sweeper.start()
    try:
        for _ in range(200):
            if sweeper.last is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        await sweeper.stop()
    assert sweeper.last is not None and (sweeper.last.jobs, sweeper.last.messages) == (4, 15)
    assert await ids(repo, Job) == expected["stay_jobs"]


def test_keep_days_is_a_storage_setting():
    from bot.core.config import parse_settings
    from bot.core.errors import ConfigError

    assert parse_settings({}).storage.keep_days == 0
    assert parse_settings({"storage": {"keep_days": 90}}).storage.keep_days == 90
    with pytest.raises(ConfigError, match="keep_days"):
        parse_settings({"storage": {"keep_days": -1}})

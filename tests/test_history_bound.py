"""What a job loads from the history: only what can fit the model's context, however old the
conversation, and every reply finished before the job started, right after its question."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event

from adapters.fake import FakeAdapter, _FakeStream
from bot.core.contracts import Outcome
from bot.core.types import ConversationKey, JobStatus, Role
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from storage import Database, Repository
from storage.models import Message, utcnow
from tests.support import make_settings

CONTEXT_MESSAGES = 3000


@pytest.fixture
def settings(tiny_model_dir, tmp_path):
    return make_settings(tiny_model_dir, tmp_path)


@contextmanager
def counting_loaded_messages() -> Iterator[list[int]]:
    """Counts `messages` rows turned into objects (anywhere, any session) while inside."""
    loaded: list[int] = []

    def on_load(target: Message, context: object) -> None:
        loaded.append(target.id)

    event.listen(Message, "load", on_load)
    try:
        yield loaded
    finally:
        event.remove(Message, "load", on_load)


async def add_context(app: ParleyApp, conversation_id: int, count: int) -> None:
    """`count` context messages from several people, in one transaction (fast)."""
    start = utcnow() - timedelta(days=30)
    async with app.database.sessions() as session, session.begin():
        session.add_all(
            Message(
                conversation_id=conversation_id,
                role=Role.USER,
                author_id=f"user{index % 7}",
                author_name=f"User{index % 7}",
                text=f"context message number {index}: the weather is fine today",
                platform_message_id=f"old-{index}",
                created_at=start + timedelta(seconds=index),
            )
            for index in range(count)
        )


async def test_an_old_conversation_loads_and_stores_only_what_fits(settings) -> None:
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        conversation = await app.repo.get_or_create_conversation(ConversationKey("fake", "chat"), is_direct=False)
        await add_context(app, conversation.id, CONTEXT_MESSAGES)
        context_window = app.client.model_info.context_window
        with counting_loaded_messages() as loaded:
            result = await fake.say("what was the weather like?", user="carol")
            assert result.outcome is Outcome.QUEUED
            assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
        job = await app.repo.get_job(result.job_id)
        [reply] = fake.replies
        assert reply.text and reply.failed is None  # the answer still works

        stored = json.dumps(job.prompt).encode()
        # At most the context window at a generous 8 characters a token, plus a page of rows.
        assert len(stored) <= context_window * 8 + 16_000, len(stored)
        assert 10 < len(job.prompt) < CONTEXT_MESSAGES // 3, len(job.prompt)
        # The newest history is what is kept, the question last.
        assert job.prompt[-1]["content"] == "Carol: what was the weather like?"
        assert job.prompt[-2]["content"].startswith(f"User{(CONTEXT_MESSAGES - 1) % 7}: context message number {CONTEXT_MESSAGES - 1}:")
        assert not any("number 0:" in m["content"] for m in job.prompt)
        # The database handed over a bounded number of rows, not the whole conversation.
        assert len(loaded) < CONTEXT_MESSAGES // 3, len(loaded)


class GatedAdapter(FakeAdapter):
    """A FakeAdapter whose replies wait at their first text until `gate` is set (the reply is
    being written, nothing of it is stored yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()):  # noqa: ANN201
        stream = await super().open_reply(conversation, reply_to, resume)
        adapter = self

        class Gated(_FakeStream):
            async def update(self, text: str) -> None:
                adapter.waiting.set()
                await adapter.gate.wait()
                await super().update(text)

        assert isinstance(stream, _FakeStream)
        return Gated(stream.reply)


async def test_a_quick_second_question_sees_the_answer_to_the_first(settings) -> None:
    fake = GatedAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        first = await fake.say("first question", user="alice", direct=True, chat="dm")
        await asyncio.wait_for(fake.waiting.wait(), 60)  # the first answer is being written, not stored
        second = await fake.say("second question", user="alice", direct=True, chat="dm")
        assert first.outcome is second.outcome is Outcome.QUEUED
        fake.gate.set()
        assert await app.router.wait_for(first.job_id) == JobStatus.DONE.value
        assert await app.router.wait_for(second.job_id) == JobStatus.DONE.value

        first_job = await app.repo.get_job(first.job_id)
        second_job = await app.repo.get_job(second.job_id)
        answer = await app.repo.get_message(first_job.reply_message_id)
        assert answer.id > second_job.message_id  # the answer was stored after the second question came
        assert second_job.prompt == [
            {"role": "system", "content": "You are a test bot."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": "second question"},
        ]


async def test_replies_sit_right_after_their_questions_and_later_ones_stay_out(tmp_path) -> None:
    """Storage alone: a group chat where people talk while the bot answers."""
    async with Database(f"sqlite+aiosqlite:///{tmp_path}/parley.db") as database:
        repo = Repository(database.sessions)
        conversation = await repo.get_or_create_conversation(ConversationKey("x", "group"), is_direct=False)

        async def ask(text: str, mid: str):  # noqa: ANN202
            message, job, _ = await repo.record_and_enqueue(
                conversation.id, author_id="a", author_name="Alice", text=text, platform_message_id=mid,
                max_pending=10, max_pending_per_conversation=10,
            )
            return message, job

        async def answer(job, text: str) -> None:  # noqa: ANN001
            assert await repo.mark_running(job.id, [])
            await repo.finish_job(job.id, reply_text=text, author_id="parley", author_name="Parley", platform_message_id=text)

        q1, job1 = await ask("q1", "1")
        await repo.record_message(conversation.id, role=Role.USER, author_id="b", author_name="Bob", text="chatter", platform_message_id="2")
        q2, job2 = await ask("q2", "3")
        q3, _ = await ask("q3", "4")
        await answer(job1, "a1")  # stored after q2 and q3 came
        await answer(job2, "a2")

        method = getattr(repo, "prompt_history", None)
        assert method is not None, "the repository has no bounded history for prompts"
        up_to_q2 = await method(conversation.id, up_to_message_id=q2.id, max_chars=10_000)
        assert [m.text for m in up_to_q2] == ["q1", "a1", "chatter", "q2"]  # a2 answers q2: not before it
        up_to_q3 = await method(conversation.id, up_to_message_id=q3.id, max_chars=10_000)
        assert [m.text for m in up_to_q3] == ["q1", "a1", "chatter", "q2", "a2", "q3"]
        # A small budget keeps the newest messages only, the question always.
        assert [m.text for m in await method(conversation.id, up_to_message_id=q3.id, max_chars=1)] == ["q3"]
        # Archived (deleted on the platform, forgotten) questions and replies stay out.
        assert await repo.archive_message(conversation.id, "1") and await repo.archive_message(conversation.id, "a1")
        up_to_q3 = await method(conversation.id, up_to_message_id=q3.id, max_chars=10_000)
        assert [m.text for m in up_to_q3] == ["chatter", "q2", "a2", "q3"]


# -- stable cuts: consecutive turns load the same first message (issue 13) ---------------------------

from tests.pg_server import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:  # noqa: ANN001
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite+aiosqlite:///{tmp_path}/parley.db"


MESSAGE_CHARS = 16


def cost(message: Message) -> int:
    return len(message.text) + len(message.author_name) + MESSAGE_CHARS


async def test_consecutive_turns_load_the_same_first_message_until_a_jump_of_a_quarter(database_url: str) -> None:
    import random

    rng = random.Random(7)
    max_chars = 8000
    step = max_chars // 4
    async with Database(database_url) as database:
        repo = Repository(database.sessions)
        conversation = await repo.get_or_create_conversation(ConversationKey("x", "long"), is_direct=True)
        # Some history before a /reset: archived, never counted.
        for index in range(5):
            await repo.record_message(
                conversation.id, role=Role.USER, author_id="a", author_name="Alice", text="old " * 300,
                platform_message_id=f"old-{index}",
            )
        await repo.reset_conversation(conversation.id)
        turns: list[list[Message]] = []
        largest = 0
        for index in range(120):
            question = await repo.record_message(
                conversation.id, role=Role.USER, author_id="a", author_name="Alice",
                text="q" * rng.randint(10, 300), platform_message_id=f"q{index}",
            )
            question = question[0] if isinstance(question, tuple) else question
            history = await repo.prompt_history(
                conversation.id, up_to_message_id=question.id, max_chars=max_chars, message_chars=MESSAGE_CHARS
            )
            assert history[-1].id == question.id
            assert sum(cost(m) for m in history) <= max_chars
            assert not any(m.text.startswith("old ") for m in history)
            turns.append(history)
            answer = await repo.record_message(
                conversation.id, role=Role.ASSISTANT, author_id="parley", author_name="Parley",
                text="a" * rng.randint(10, 300), platform_message_id=f"a{index}",
            )
            largest = max(largest, cost(question), cost(answer[0] if isinstance(answer, tuple) else answer))

    trimmed = [history for history in turns if history[0].platform_message_id != "q0"]
    assert len(trimmed) > 60  # the conversation outgrew the bound long ago
    jumps = 0
    for before, after in zip(turns, turns[1:]):
        before_ids, after_ids = [m.id for m in before], [m.id for m in after]
        if before_ids[0] == after_ids[0]:
            # The same first message: this turn's history is the last one's plus its answer and the new question.
            assert after_ids[: len(before_ids)] == before_ids
            assert len(after_ids) == len(before_ids) + 2
            continue
        jumps += 1
        start = before_ids.index(after_ids[0])
        left_out = sum(cost(m) for m in before[:start])
        # About a quarter of the bound at once: both cuts lie within a message (and a skipped reply) of their grid line.
        assert step - 2 * largest <= left_out <= step + 2 * largest, (left_out, step)
    assert jumps <= len(turns) // 6, jumps

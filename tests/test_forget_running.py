"""`/forget` reaches the reply being written (issue 11, item 5): the author's running reply is
stopped, and no reply to a forgotten message stays in the history, even one that finishes in the
same instant as the `/forget`."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from adapters.fake import FakeAdapter, FakeReply
from bot.core.contracts import Outcome, ReplyStream
from bot.core.types import ConversationKey, JobStatus, Role
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from storage import Database, Repository
from tests.support import make_settings


class _HeldStream(ReplyStream):
    """A platform that is slow to show the first text: the reply stays running until released."""

    def __init__(self, reply: FakeReply, release: asyncio.Event, shown: asyncio.Event) -> None:
        self.reply, self.release, self.shown = reply, release, shown

    async def update(self, text: str) -> None:
        self.reply.updates.append(text)
        self.shown.set()
        await self.release.wait()

    async def finish(self, text: str) -> list[str]:
        self.reply.text = text
        return [self.reply.message_id]

    async def fail(self, notice: str) -> None:
        self.reply.failed = notice


class HeldAdapter(FakeAdapter):
    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.shown = asyncio.Event()

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()) -> ReplyStream:
        reply = FakeReply(conversation, reply_to, message_id=f"bot-{len(self.replies) + 1}")
        self.replies.append(reply)
        return _HeldStream(reply, self.release, self.shown)


async def test_forget_stops_the_authors_running_reply(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_model_dir, tmp_path, generation={"max_new_tokens": 64})
    fake = HeldAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        asked = await fake.say("tell me a secret", user="ann", chat="room")
        assert asked.outcome is Outcome.QUEUED
        await asyncio.wait_for(fake.shown.wait(), 30)  # the reply is being written
        forgot = await fake.say("/forget", user="ann", chat="room")
        fake.release.set()
        status = await asyncio.wait_for(app.router.wait_for(asked.job_id), 30)
        assert status == JobStatus.CANCELLED.value, forgot.reply
        conversation = await app.repo.find_conversation(ConversationKey("fake", "room"))
        assert conversation is not None
        assert await app.repo.history(conversation.id) == []  # neither the question nor any reply


async def test_a_reply_finishing_after_forget_is_stored_out_of_the_history(tmp_path: Path) -> None:
    async with Database(f"sqlite+aiosqlite:///{tmp_path}/forget.db") as database:
        repo = Repository(database.sessions)
        conversation = await repo.get_or_create_conversation(ConversationKey("fake", "room"), is_direct=False)
        _, job, _ = await repo.record_and_enqueue(
            conversation.id, author_id="ann", author_name="Ann", text="secret", platform_message_id="1",
            max_pending=10, max_pending_per_conversation=10,
        )
        assert job is not None and await repo.mark_running(job.id, [])
        archived, _ = await repo.forget_author(conversation.id, "ann")
        assert archived == 1
        reply = await repo.finish_job(
            job.id, reply_text="the secret answer", author_id="parley", author_name="Parley", platform_message_id="b1"
        )
        assert reply.role is Role.ASSISTANT and reply.archived
        assert await repo.history(conversation.id) == []

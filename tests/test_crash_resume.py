"""A reply cut by a crash or restart goes on from the text it had shown (issue 14): the text shown
so far is persisted on the job while it streams (`jobs.shown_text`), and the next attempt makes it
the start of the assistant's turn, edits the same messages and appends, instead of generating the
reply afresh (which would change it under the reader's eyes).

The restart is simulated in process: a new app (queue, router, repository with a new owner id) over
the same database. tests/test_crash.py does it with SIGKILLed `parley run` processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.fake import FakeAdapter
from bot.core.contracts import Control
from bot.core.types import ChatMessage, JobStatus
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from tests.support import ScriptedClient, make_settings


async def until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    async def wait() -> None:
        while not await condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), timeout)


async def test_a_reply_cut_by_a_restart_goes_on_from_the_shown_text(tmp_path: Path) -> None:
    settings = make_settings(Path("unused"), tmp_path, generation={"max_new_tokens": 40})
    client = ScriptedClient(pause=0.005, hold_after=3)  # the reply is mid-stream when the bot stops
    before = FakeAdapter()
    async with ParleyApp(settings, [before], client=client) as app:
        job_id = (await before.say("tell me a story", direct=True, chat="dm")).job_id

        async def shown_persisted() -> bool:
            job = await app.repo.get_job(job_id)
            shown = before.replies[-1].updates[-1] if before.replies and before.replies[-1].updates else None
            return job.shown_text == shown == "s1w1 s1w2 s1w3"

        await until(shown_persisted)
        message_id = before.replies[-1].message_id
    # The bot stopped with the reply half shown: the job stays running in the database.
    client.release.set()
    after = FakeAdapter()
    async with ParleyApp(settings, [after], client=client) as app:
        assert await app.router.wait_for(job_id) == JobStatus.DONE.value
        [reply] = after.replies
        assert reply.message_id == message_id  # the same message, edited
        assert reply.updates[0] == "s1w1 s1w2 s1w3"  # it starts with what was shown
        assert reply.text == " ".join(f"s1w{i}" for i in range(1, 41))
        assert reply.controls == (Control.REGENERATE,)
        # The model went on from the shown text, as the start of its own turn.
        assert client.requests[-1].messages[-1] == ChatMessage("assistant", "s1w1 s1w2 s1w3")
        assert len(client.samples) == 1  # nothing was generated afresh
        job = await app.repo.get_job(job_id)
        assert job.prompt[-1] == {"role": "assistant", "content": "s1w1 s1w2 s1w3"}
        conversation = await app.repo.get_conversation(job.conversation_id)
        texts = [(m.role.value, m.text) for m in await app.repo.history(conversation.id)]
        assert texts == [("user", "tell me a story"), ("assistant", reply.text)]


async def test_the_real_engine_goes_on_from_the_shown_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same with the tiny model in the in-process engine: the final reply starts with the text
    an interrupted attempt had shown."""
    settings = make_settings(tiny_model_dir, tmp_path, generation={"max_new_tokens": 8})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await app.queue.stop()
        job_id = (await fake.say("are you there?", direct=True, chat="dm")).job_id
        # As if the process died mid-reply, with "Yes, I am" shown in message bot-41.
        assert await app.repo.mark_running(job_id, [])
        await app.repo.set_reply_platform_ids(job_id, ["bot-41"])
        await app.repo.set_shown_text(job_id, "Yes, I am")
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        assert await app.router.wait_for(job_id) == JobStatus.DONE.value
        [reply] = fake.replies
        assert reply.message_id == "bot-41"
        assert reply.updates[0] == "Yes, I am"
        assert reply.text.startswith("Yes, I am")
        job = await app.repo.get_job(job_id)
        assert job.prompt[-1] == {"role": "assistant", "content": "Yes, I am"}


async def test_a_restarted_continue_goes_on_from_its_shown_text(tmp_path: Path) -> None:
    """A Continue cut by a restart: what it had shown already holds the reply it extends."""
    settings = make_settings(Path("unused"), tmp_path, generation={"max_new_tokens": 3})
    client = ScriptedClient(pause=0.005)
    before = FakeAdapter()
    async with ParleyApp(settings, [before], client=client) as app:
        asked = await before.say("go", direct=True, chat="dm")
        assert await app.router.wait_for(asked.job_id) == JobStatus.DONE.value
        client.hold_after = 2
        pressed = await before.press(asked.job_id, Control.CONTINUE, chat="dm", direct=True)

        async def shown_persisted() -> bool:
            job = await app.repo.get_job(pressed.job_id)
            return job.shown_text == "s1w1 s1w2 s1w3 s1w4 s1w5"

        await until(shown_persisted)
    client.release.set()
    after = FakeAdapter()
    async with ParleyApp(settings, [after], client=client) as app:
        assert await app.router.wait_for(pressed.job_id) == JobStatus.DONE.value
        [reply] = after.replies
        assert reply.text == "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6 s1w7 s1w8"
        job = await app.repo.get_job(pressed.job_id)
        conversation = await app.repo.get_conversation(job.conversation_id)
        texts = [(m.role.value, m.text) for m in await app.repo.history(conversation.id)]
        assert texts == [("user", "go"), ("assistant", reply.text)]

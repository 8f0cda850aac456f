"""Reply controls (issue 14): Stop, Regenerate and Continue, pressed through `Core.press`.

The real router, queue, storage (real migrations) and FakeAdapter; the backend is a scripted one
(tests.support.ScriptedClient) that honours cancellation at its next step and continues a chat
ending in an assistant message from exactly where that message ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.fake import FakeAdapter
from bot.conversation import messages
from bot.core.contracts import Control, Outcome, RefusalKind
from bot.core.types import ChatMessage, ConversationKey, JobStatus
from bot.runtime.app import ParleyApp
from storage import Message
from tests.support import ScriptedClient, make_settings

ROOM = ConversationKey("fake", "room")


def settings_for(tmp_path: Path, max_new_tokens: int = 40):  # noqa: ANN201
    return make_settings(Path("unused"), tmp_path, generation={"max_new_tokens": max_new_tokens})


async def until(condition, timeout: float = 10.0) -> None:  # noqa: ANN001
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(wait(), timeout)


async def asked(fake: FakeAdapter, app: ParleyApp, text: str = "tell me", *, user: str = "ann", status: str = "done") -> int:
    result = await fake.say(text, user=user, chat="room")
    assert result.outcome is Outcome.QUEUED, result
    assert await app.router.wait_for(result.job_id) == status
    return result.job_id


async def history(app: ParleyApp) -> list[tuple[str, str]]:
    conversation = await app.repo.find_conversation(ROOM)
    return [(m.role.value, m.text) for m in await app.repo.history(conversation.id)]


async def all_messages(app: ParleyApp) -> list[Message]:
    async with app.database.sessions() as session:
        return list((await session.scalars(select(Message).order_by(Message.id))).all())


async def test_stop_ends_the_reply_at_the_next_step_and_stores_it_as_stopped(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.02)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path), [fake], client=client) as app:
        result = await fake.say("tell me", user="ann", chat="room")
        await until(lambda: any(len(r.updates) >= 3 for r in fake.replies))
        reply = fake.reply_of(result.job_id)
        assert reply.controls == (Control.STOP,)
        pressed = await fake.press(result.job_id, Control.STOP, user="ann", chat="room")
        assert pressed.outcome is Outcome.COMMAND and pressed.reply == messages.STOPPING and pressed.private
        shown_at_press = len(reply.updates)
        assert await app.router.wait_for(result.job_id) == JobStatus.CANCELLED.value
        # One decode step at most (the step under way), then the final edit.
        assert len(reply.updates) <= shown_at_press + 1
        assert reply.text == f"{reply.updates[-1]}\n{messages.STOPPED}"
        assert reply.controls == (Control.REGENERATE,)
        assert reply.control_history == [(Control.STOP,), (Control.REGENERATE,)]
        assert await history(app) == [("user", "tell me"), ("assistant", reply.text)]
        job = await app.repo.get_job(result.job_id)
        assert job.finish_reason == "cancelled" and job.reply_message_id is not None
        # Stop on a stopped reply has expired.
        again = await fake.press(result.job_id, Control.STOP, user="ann", chat="room")
        assert again.outcome is Outcome.REFUSED and again.refusal.kind is RefusalKind.CONTROL_EXPIRED


async def test_someone_elses_stop_is_refused_and_the_reply_goes_on(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.01, hold_after=2)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 6), [fake], client=client) as app:
        result = await fake.say("tell me", user="ann", chat="room")
        await until(lambda: any(r.updates for r in fake.replies))
        refused = await fake.press(result.job_id, Control.STOP, user="bob", chat="room")
        assert refused.outcome is Outcome.REFUSED and refused.refusal.kind is RefusalKind.NOT_YOURS
        assert refused.private and refused.reply == messages.render_refusal(refused.refusal)
        client.release.set()
        assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
        assert fake.reply_of(result.job_id).text == "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6"


async def test_an_admin_may_stop_anyones_reply(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.01, hold_after=2)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path), [fake], client=client) as app:
        result = await fake.say("tell me", user="ann", chat="room")
        await until(lambda: any(r.updates for r in fake.replies))
        pressed = await fake.press(result.job_id, Control.STOP, user="root", admin=True, chat="room")
        assert pressed.outcome is Outcome.COMMAND
        assert await app.router.wait_for(result.job_id) == JobStatus.CANCELLED.value


async def test_a_press_delivered_twice_runs_once(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.001)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=client) as app:
        job_id = await asked(fake, app)
        first = await fake.press(job_id, Control.REGENERATE, user="ann", chat="room", press_id="tap-1")
        redelivered = await fake.press(job_id, Control.REGENERATE, user="ann", chat="room", press_id="tap-1")
        double_tap = await fake.press(job_id, Control.REGENERATE, user="ann", chat="room", press_id="tap-2")
        assert first.outcome is Outcome.QUEUED
        assert redelivered.outcome is Outcome.DUPLICATE
        assert double_tap.outcome in (Outcome.DUPLICATE, Outcome.REFUSED)  # waiting, or done by now
        assert await app.router.wait_for(first.job_id) == JobStatus.DONE.value
        await app.queue.run_until_empty()
        assert len(client.requests) == 2  # the question, answered once again


async def test_presses_at_the_same_moment_queue_one_followup(tmp_path: Path) -> None:
    """Two members press Regenerate together (two platform ids): the check for a follow-up
    already waiting and the enqueue are one transaction, so exactly one runs."""
    client = ScriptedClient(pause=0.001)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=client) as app:
        job_id = await asked(fake, app)
        presses = await asyncio.gather(
            *(
                fake.press(job_id, Control.REGENERATE, user=user, admin=user == "root", chat="room", press_id=f"tap-{n}")
                for n, user in enumerate(["ann", "root", "ann", "root"])
            )
        )
        queued = [p for p in presses if p.outcome is Outcome.QUEUED]
        assert len(queued) == 1, [p.outcome for p in presses]
        assert all(p.outcome is Outcome.DUPLICATE for p in presses if p is not queued[0])
        assert await app.router.wait_for(queued[0].job_id) == JobStatus.DONE.value
        await app.queue.run_until_empty()
        assert len(client.requests) == 2


async def test_regenerate_replaces_the_reply_in_place(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.001)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=client) as app:
        job_id = await asked(fake, app, "what is it?")
        old = fake.reply_of(job_id)
        assert old.text == "s1w1 s1w2 s1w3"
        pressed = await fake.press(job_id, Control.REGENERATE, user="ann", chat="room")
        assert pressed.outcome is Outcome.QUEUED and pressed.reply == messages.REGENERATING
        assert await app.router.wait_for(pressed.job_id) == JobStatus.DONE.value
        new = fake.reply_of(pressed.job_id)
        assert new.message_id == old.message_id  # the same platform message, edited
        assert new.text == "s2w1 s2w2 s2w3"
        assert await history(app) == [("user", "what is it?"), ("assistant", "s2w1 s2w2 s2w3")]
        rows = [(m.text, m.archived, m.platform_message_id) for m in await all_messages(app) if m.role.value == "assistant"]
        assert rows == [("s1w1 s1w2 s1w3", True, None), ("s2w1 s2w2 s2w3", False, old.message_id)]
        # The regenerated question is the same one; the history before it is the same.
        assert client.requests[1].messages == client.requests[0].messages
        assert fake.shown_controls(old.message_id) == (Control.REGENERATE, Control.CONTINUE)
        # The replaced reply's controls are gone: a press on it has expired.
        stale = await fake.press(job_id, Control.REGENERATE, user="ann", chat="room")
        assert stale.outcome is Outcome.REFUSED and stale.refusal.kind is RefusalKind.CONTROL_EXPIRED


async def test_continue_after_a_length_cut_appends_and_stores_the_whole(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.001)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=client) as app:
        job_id = await asked(fake, app)
        first = fake.reply_of(job_id)
        assert (await app.repo.get_job(job_id)).finish_reason == "length"
        assert first.controls == (Control.REGENERATE, Control.CONTINUE)
        pressed = await fake.press(job_id, Control.CONTINUE, user="ann", chat="room")
        assert pressed.outcome is Outcome.QUEUED and pressed.reply == messages.CONTINUING
        assert await app.router.wait_for(pressed.job_id) == JobStatus.DONE.value
        # The model went on from the partial reply, as the start of its own turn.
        assert client.requests[-1].messages[-1] == ChatMessage("assistant", "s1w1 s1w2 s1w3")
        assert client.requests[-1].messages[:-1] == client.requests[0].messages
        second = fake.reply_of(pressed.job_id)
        assert second.message_id == first.message_id
        assert second.updates[0] == "s1w1 s1w2 s1w3"  # the old text first, then the new deltas
        assert second.text == "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6"
        assert await history(app) == [("user", "tell me"), ("assistant", "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6")]
        # Cut again: Continue again.
        assert second.controls == (Control.REGENERATE, Control.CONTINUE)
        again = await fake.press(pressed.job_id, Control.CONTINUE, user="ann", chat="room")
        assert await app.router.wait_for(again.job_id) == JobStatus.DONE.value
        assert (await history(app))[-1] == ("assistant", " ".join(f"s1w{i}" for i in range(1, 10)))


async def test_continue_only_after_a_length_cut(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.001, sample=lambda n: ["short", " answer"])
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 5), [fake], client=client) as app:
        job_id = await asked(fake, app)
        assert fake.reply_of(job_id).controls == (Control.REGENERATE,)
        pressed = await fake.press(job_id, Control.CONTINUE, user="ann", chat="room")
        assert pressed.outcome is Outcome.REFUSED and pressed.refusal.kind is RefusalKind.CONTROL_EXPIRED


async def test_continue_and_regenerate_after_a_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, 3)
    first_fake = FakeAdapter()
    client = ScriptedClient(pause=0.001)
    async with ParleyApp(settings, [first_fake], client=client) as app:
        job_id = await asked(first_fake, app)
        message_id = first_fake.reply_of(job_id).message_id
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=client) as app:
        pressed = await fake.press(job_id, Control.CONTINUE, user="ann", chat="room")
        assert pressed.outcome is Outcome.QUEUED
        assert await app.router.wait_for(pressed.job_id) == JobStatus.DONE.value
        reply = fake.reply_of(pressed.job_id)
        assert reply.message_id == message_id and reply.text == "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6"
        assert await history(app) == [("user", "tell me"), ("assistant", reply.text)]
        regenerated = await fake.press(pressed.job_id, Control.REGENERATE, user="ann", chat="room")
        assert await app.router.wait_for(regenerated.job_id) == JobStatus.DONE.value
        assert fake.reply_of(regenerated.job_id).message_id == message_id
        assert await history(app) == [("user", "tell me"), ("assistant", "s2w1 s2w2 s2w3")]


async def test_a_press_after_reset_says_the_conversation_was_reset(tmp_path: Path) -> None:
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=ScriptedClient(pause=0.001)) as app:
        job_id = await asked(fake, app)
        reset = await fake.say("/reset", user="root", admin=True, chat="room")
        assert reset.outcome is Outcome.COMMAND
        for control in Control:
            pressed = await fake.press(job_id, control, user="ann", chat="room")
            assert pressed.outcome is Outcome.REFUSED and pressed.refusal.kind is RefusalKind.CONVERSATION_RESET
            assert pressed.reply == "This conversation was reset."


async def test_a_reply_stopped_by_reset_keeps_its_text_and_offers_nothing(tmp_path: Path) -> None:
    client = ScriptedClient(pause=0.01, hold_after=3)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path), [fake], client=client) as app:
        result = await fake.say("tell me", user="ann", chat="room")
        await until(lambda: any(len(r.updates) >= 3 for r in fake.replies))
        reset = await fake.say("/reset", user="root", admin=True, chat="room")
        assert reset.outcome is Outcome.COMMAND
        client.release.set()
        assert await app.router.wait_for(result.job_id) == JobStatus.CANCELLED.value
        reply = fake.reply_of(result.job_id)
        assert reply.text.endswith(messages.STOPPED) and reply.text.startswith("s1w1 s1w2 s1w3")
        assert reply.controls == ()  # Regenerate would only say the conversation was reset
        assert await history(app) == []


async def test_a_newer_reply_retires_the_older_ones_controls(tmp_path: Path) -> None:
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=ScriptedClient(pause=0.001)) as app:
        first = await asked(fake, app, "one")
        older = fake.reply_of(first)
        assert older.controls == (Control.REGENERATE, Control.CONTINUE)
        second = await asked(fake, app, "two")
        assert fake.shown_controls(older.message_id) == ()
        assert (ROOM, (older.message_id,)) in fake.cleared
        assert fake.reply_of(second).controls == (Control.REGENERATE, Control.CONTINUE)
        for control in (Control.REGENERATE, Control.CONTINUE):
            pressed = await fake.press(first, control, user="ann", chat="room")
            assert pressed.outcome is Outcome.REFUSED and pressed.refusal.kind is RefusalKind.CONTROL_EXPIRED


async def test_the_terminal_presses_without_a_press_id(tmp_path: Path) -> None:
    """The terminal's conversation is direct; its presses carry no platform id."""
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path, 3), [fake], client=ScriptedClient(pause=0.001)) as app:
        result = await fake.say("hello", user="local", chat="default", direct=True)
        assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
        pressed = await fake.press(result.job_id, Control.CONTINUE, user="someone", chat="default", press_id="")
        assert pressed.outcome is Outcome.QUEUED
        assert await app.router.wait_for(pressed.job_id) == JobStatus.DONE.value
        assert fake.reply_of(pressed.job_id).text == "s1w1 s1w2 s1w3 s1w4 s1w5 s1w6"


@pytest.mark.parametrize(
    ("pieces", "stored"),
    [
        (["Here:\n```python\n", "x = 1\n", "y = 2\n", "z = 3\n"], "Here:\n```python\nx = 1\n```\n[stopped]"),
        (["Done:\n```\n", "x\n```\n", "after", " more"], "Done:\n```\nx\n```\nafter\n[stopped]"),
    ],
)
async def test_the_stopped_marker_never_lands_in_a_code_block(tmp_path: Path, pieces: list[str], stored: str) -> None:
    client = ScriptedClient(pause=0.01, hold_after=2 if "x = 1\n" in pieces else 3, sample=lambda n: pieces)
    fake = FakeAdapter()
    async with ParleyApp(settings_for(tmp_path), [fake], client=client) as app:
        result = await fake.say("code please", user="ann", chat="room")
        await until(lambda: any(len(r.updates) >= (2 if "x = 1\n" in pieces else 3) for r in fake.replies))
        await fake.press(result.job_id, Control.STOP, user="ann", chat="room")
        assert await app.router.wait_for(result.job_id) == JobStatus.CANCELLED.value
        assert fake.reply_of(result.job_id).text == stored
        assert (await history(app))[-1] == ("assistant", stored)

"""The core end to end: FakeAdapter → router → storage → queue → real worker engine (tiny model).

Only the people are simulated (FakeAdapter.say); the router, commands, queue, storage with its
real migrations, and the generation engine are the real ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import dataclasses

import pytest

from adapters.fake import FakeAdapter
from bot.core.contracts import Outcome, QueueLimit, Refusal, RefusalKind
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from bot.conversation.history import GROUP_NOTE
from bot.core.types import JobStatus
from tests.support import make_settings


@pytest.fixture
def settings(tiny_model_dir, tmp_path):
    return make_settings(tiny_model_dir, tmp_path)


@pytest.fixture
async def bot(settings):
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        yield fake, app


async def answered(fake, app, text, **kwargs):
    result = await fake.say(text, **kwargs)
    assert result.outcome is Outcome.QUEUED, result
    assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
    return result.job_id


async def test_a_direct_message_is_answered_and_stored(bot):
    fake, app = bot
    job_id = await answered(fake, app, "Hello there", direct=True, chat="dm")
    [reply] = fake.replies_in("dm")
    assert reply.text and reply.failed is None
    conversation = await app.repo.get_or_create_conversation(reply.conversation, is_direct=True)
    history = await app.repo.history(conversation.id)
    assert [(m.role, m.text) for m in history] == [("user", "Hello there"), ("assistant", reply.text)]
    assert history[1].platform_message_id == reply.message_id
    job = await app.repo.get_job(job_id)
    assert job.status == "done" and job.reply_message_id == history[1].id
    assert job.prompt == [
        {"role": "system", "content": "You are a test bot."},
        {"role": "user", "content": "Hello there"},
    ]


async def test_group_messages_not_addressed_are_context_with_authors(bot):
    fake, app = bot
    result = await fake.say("the meeting is at noon", user="bob", addressed=False)
    assert result.outcome is Outcome.RECORDED and result.job_id is None
    await asyncio.sleep(0.05)
    assert fake.replies == []  # nothing was sent to the model
    job_id = await answered(fake, app, "when is the meeting?", user="carol")
    job = await app.repo.get_job(job_id)
    assert job.prompt[0] == {"role": "system", "content": f"You are a test bot.\n\n{GROUP_NOTE}"}
    assert job.prompt[1:] == [
        {"role": "user", "content": "Bob: the meeting is at noon"},
        {"role": "user", "content": "Carol: when is the meeting?"},
    ]


async def test_bots_and_empty_messages_are_ignored(bot):
    fake, app = bot
    assert (await fake.say("hi", is_bot=True)).outcome is Outcome.IGNORED
    assert (await fake.say("   ")).outcome is Outcome.IGNORED
    assert (await fake.say("/status@someotherbot")).outcome is Outcome.IGNORED
    assert await app.queue.depth() == 0


async def test_a_redelivered_message_is_answered_once(bot):
    fake, app = bot
    first = await fake.say("hi", message_id="same")
    again = await fake.say("hi", message_id="same")
    assert first.outcome is Outcome.QUEUED and again.outcome is Outcome.DUPLICATE and again.job_id == first.job_id
    await app.queue.run_until_empty()
    assert len(fake.replies) == 1


async def test_admin_commands_are_refused_for_members_in_shared_chats(bot):
    fake, app = bot
    await answered(fake, app, "remember this", user="bob")
    conversation = await app.repo.get_or_create_conversation(fake.message("x").conversation, is_direct=False)
    for command in ("/reset", "/reset new prompt", "/system You are a pirate.", "/system clear", "/set temperature=1"):
        result = await fake.say(command, user="mallory", admin=False)
        assert result.outcome is Outcome.COMMAND
        assert result.reply.startswith("Only admins can use /") and "Nothing was changed" in result.reply
    after = await app.repo.get_conversation(conversation.id)
    assert after.system_prompt is None and after.temperature is None
    assert len(await app.repo.history(conversation.id)) == 2
    assert await app.repo.audit_log(conversation.id) == []
    # Reading is for everyone.
    shown = await fake.say("/system", user="mallory")
    assert shown.reply == "System prompt (default): You are a test bot."


async def test_admin_system_prompt_reaches_the_next_prompt_and_is_audited(bot):
    fake, app = bot
    result = await fake.say("/system You are a pirate.", user="ann", admin=True)
    assert result.reply == "System prompt set: You are a pirate."
    job_id = await answered(fake, app, "hello", user="bob")
    job = await app.repo.get_job(job_id)
    assert job.prompt[0]["content"].startswith("You are a pirate.")
    conversation_id = job.conversation_id
    [entry] = await app.repo.audit_log(conversation_id)
    assert (entry.action, entry.actor_id) == ("system", "ann")
    await fake.say("/system clear", user="ann", admin=True)
    job = await app.repo.get_job(await answered(fake, app, "again", user="bob"))
    assert job.prompt[0] == {"role": "system", "content": GROUP_NOTE}
    assert (await fake.say("/system", direct=True, chat="dm")).reply.startswith("System prompt (default)")


async def test_reset_empties_history_cancels_pending_and_can_set_a_prompt(bot):
    fake, app = bot
    await answered(fake, app, "one", direct=True, chat="dm")
    result = await fake.say("/reset Be brief.", direct=True, chat="dm")
    assert result.reply.startswith("History cleared (2 messages forgotten)")
    assert "New system prompt: Be brief." in result.reply
    job = await app.repo.get_job(await answered(fake, app, "two", direct=True, chat="dm"))
    assert job.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "two"}]
    conversation = await app.repo.get_conversation(job.conversation_id)
    assert [entry.action for entry in await app.repo.audit_log(conversation.id)] == ["reset"]


async def test_set_changes_generation_settings_within_ranges(bot):
    fake, app = bot
    bad = await fake.say("/set temperature=5 top_p=0.5", direct=True, chat="dm")
    assert bad.reply.startswith("Nothing changed: temperature must be between 0 and 2")
    good = await fake.say("/set temperature=0.9 max_new_tokens=3", direct=True, chat="dm")
    assert good.reply == "Settings now: temperature=0.9, top_p=0.9, max_new_tokens=3"
    back = await fake.say("/set temperature=default", direct=True, chat="dm")
    assert back.reply == "Settings now: temperature=0.0, top_p=0.9, max_new_tokens=3"
    shown = await fake.say("/set", direct=True, chat="dm")
    assert shown.reply.startswith("Settings: temperature=0.0, top_p=0.9, max_new_tokens=3")


async def test_status_help_and_unknown_commands(bot):
    fake, app = bot
    status = (await fake.say("/status", direct=True, chat="dm")).reply
    info = app.client.model_info
    assert f"Model: {info.name} (none, float32, on cpu, context {info.context_window} tokens)" in status
    assert "Queue: 0 waiting or running; nothing of yours waiting" in status
    assert "History: 0 messages" in status
    assert "/reset [new system prompt]" in (await fake.say("/help")).reply
    assert (await fake.say("/frobnicate")).reply == "Unknown command /frobnicate. Try /help."


async def test_queue_bound_gives_a_busy_answer_and_keeps_the_message(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, queue={"max_pending": 2, "max_pending_per_conversation": 1})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await app.queue.stop()  # hold dispatch so the jobs stay pending
        assert (await fake.say("a", chat="one")).outcome is Outcome.QUEUED
        busy = await fake.say("b", chat="one")
        assert busy.outcome is Outcome.BUSY and busy.reply.startswith("I'm busy right now")
        assert (await fake.say("c", chat="two")).outcome is Outcome.QUEUED
        assert (await fake.say("d", chat="three")).outcome is Outcome.BUSY
        conversation = await app.repo.get_or_create_conversation(fake.message("x", chat="one").conversation, is_direct=False)
        assert [m.text for m in await app.repo.history(conversation.id)] == ["a", "b"]


async def test_round_robin_across_conversations_one_job_each_at_a_time(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, worker={"max_batch": 1})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await app.queue.stop()
        ids = {}
        for chat, count in (("A", 3), ("B", 2), ("C", 1)):
            for n in range(1, count + 1):
                ids[(await fake.say(f"{chat}{n}", chat=chat)).job_id] = f"{chat}{n}"
        expected = ["A1", "B1", "C1", "A2", "B2", "A3"]
        assert [ids[j] for j in await app.queue.dispatch_order()] == expected
        mine = next(j for j, name in ids.items() if name == "B2")
        assert await app.queue.position_of(mine) == 5
        status = (await fake.say("/status", chat="B", user="alice")).reply
        assert "your next reply is number 2" in status  # alice's B1 is second in line
        await app.queue.start()
        await app.queue.run_until_empty()
        jobs = [await app.repo.get_job(j) for j in ids]
        started = [ids[job.id] for job in sorted(jobs, key=lambda job: job.started_at)]
        assert started == expected
        assert all(job.status == "done" for job in jobs)


async def test_jobs_interrupted_by_a_crash_are_answered_after_restart(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path)
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await app.queue.stop()
        job_id = (await fake.say("are you there?")).job_id
        assert await app.repo.mark_running(job_id, [])  # as if the process died mid-reply
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        assert await app.router.wait_for(job_id) == "done"
        assert len(fake.replies) == 1 and fake.replies[0].text


async def test_many_conversations_at_once_all_get_one_reply(bot):
    fake, app = bot
    results = await asyncio.gather(*(fake.say(f"hello {n}", chat=f"c{n}") for n in range(10)))
    await app.queue.run_until_empty()
    assert {r.outcome for r in results} == {Outcome.QUEUED}
    assert sorted(r.conversation.key for r in fake.replies) == sorted(f"c{n}" for n in range(10))
    assert all(r.text for r in fake.replies)
    assert app.queue.stats["done"] == 10


def test_incoming_message_is_frozen():
    message = FakeAdapter().message("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.text = "changed"  # type: ignore[misc]


async def _kill_worker_after_first_text(fake, app):
    while not (fake.replies and fake.replies[-1].updates):
        await asyncio.sleep(0.005)
    health = await app.client.health()
    os.kill(health.pid, signal.SIGKILL)
    return health.pid


async def test_worker_killed_during_a_reply_restarts_and_still_answers(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, generation={"max_new_tokens": 300})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake]) as app:  # the real worker process
        result = await fake.say("tell me a long story", direct=True, chat="dm")
        killed = await _kill_worker_after_first_text(fake, app)
        assert await app.router.wait_for(result.job_id) == "done"
        job = await app.repo.get_job(result.job_id)
        assert job.attempts == 1 and "backend down" in job.error
        health = await app.client.health()
        assert health.alive and health.restarts == 1 and health.pid != killed
        [reply] = fake.replies
        assert reply.text and reply.failed is None
        history = await app.repo.history(job.conversation_id)
        assert [m.role for m in history] == ["user", "assistant"]


async def test_a_reply_that_keeps_killing_the_worker_ends_in_a_clear_error(tiny_model_dir, tmp_path, caplog):
    settings = make_settings(tiny_model_dir, tmp_path, generation={"max_new_tokens": 300}, worker={"max_attempts": 1})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake]) as app:
        result = await fake.say("tell me a long story", direct=True, chat="dm")
        await _kill_worker_after_first_text(fake, app)
        assert await app.router.wait_for(result.job_id) == "failed"
        assert fake.replies[0].failed.startswith("Sorry, the model crashed while answering this message")
        # The next message is answered by the restarted worker.
        follow_up = await fake.say("hello again", direct=True, chat="dm", )
        assert await app.router.wait_for(follow_up.job_id) == "done"
    assert any("worker" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_per_user_pending_limit_and_message_rate_limit(tiny_model_dir, tmp_path):
    settings = make_settings(
        tiny_model_dir, tmp_path, queue={"max_pending_per_user": 2, "user_messages_per_minute": 4}
    )
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await app.queue.stop()  # hold dispatch so jobs stay pending
        assert (await fake.say("one", chat="a", user="ann")).outcome is Outcome.QUEUED
        assert (await fake.say("two", chat="b", user="ann")).outcome is Outcome.QUEUED
        third = await fake.say("three", chat="c", user="ann")
        assert third.outcome is Outcome.BUSY
        assert third.refusal == Refusal(RefusalKind.QUEUE_FULL, limit=QueueLimit.USER, count=2, maximum=2)
        assert third.reply.startswith("I'm busy right now: you already have 2 requests waiting (the limit is 2)")
        assert (await fake.say("hi", chat="c", user="bob")).outcome is Outcome.QUEUED  # others are not held up
        fourth = await fake.say("four", chat="c", user="ann")  # ann's 4th message this minute: allowed
        assert fourth.outcome is Outcome.BUSY and "you already have 2" in fourth.reply
        fifth = await fake.say("five", chat="c", user="ann")
        assert fifth.outcome is Outcome.BUSY
        assert fifth.reply.startswith("You're sending messages faster than I can answer; try again in ")
        seconds = int(fifth.reply.rsplit("in ", 1)[1].split()[0])
        assert 1 <= seconds <= 60


async def test_bad_input_gets_clear_answers_and_nothing_reaches_the_model(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, bot={"max_input_chars": 100})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        long = await fake.say("x" * 101, direct=True, chat="dm")
        assert long.outcome is Outcome.REFUSED
        assert long.reply == "That message is too long (101 characters; the limit is 100). Nothing was sent to the model."
        assert (await fake.say("\x00\x01 \u200b\t ", direct=True, chat="dm")).outcome in (Outcome.IGNORED, Outcome.QUEUED)
        huge_system = await fake.say("/system " + "y" * 10_000_000, direct=True, chat="dm")
        assert huge_system.outcome is Outcome.REFUSED and "too long" in huge_system.reply
        banana = await fake.say("/set temperature=banana", direct=True, chat="dm")
        assert banana.reply.startswith("Nothing changed: temperature must be a number, not 'banana'")
        unknown = await fake.say("/set unknown=1", direct=True, chat="dm")
        assert unknown.reply.startswith("Nothing changed: unknown setting 'unknown'")
        odd = await fake.say("hello \ud800 there\x07\r\nbye", direct=True, chat="dm")
        assert odd.outcome is Outcome.QUEUED
        await app.router.wait_for(odd.job_id)
        job = await app.repo.get_job(odd.job_id)
        assert job.prompt[-1]["content"] == "hello \ufffd there\nbye"
        conversation = await app.repo.get_conversation(job.conversation_id)
        assert conversation.system_prompt is None  # nothing above changed it


async def test_model_shows_the_model_and_this_conversations_settings(bot):
    fake, app = bot
    await fake.say("/set temperature=0.9", direct=True, chat="dm")
    result = await fake.say("/model", direct=True, chat="dm")
    info = app.client.model_info
    assert result.outcome is Outcome.COMMAND and result.private
    assert result.reply.splitlines() == [
        f"Model: {info.name}",
        "Quantization: none; dtype: float32; device: cpu",
        f"Context window: {info.context_window} tokens",
        "Settings here: temperature=0.9, top_p=0.9, max_new_tokens=6",
    ]
    assert "/model: the model, how it runs" in (await fake.say("/help")).reply


async def test_forget_removes_only_the_authors_messages_and_replies(bot):
    fake, app = bot
    await answered(fake, app, "my secret is 42", user="ann", chat="room")
    await answered(fake, app, "the weather is nice", user="bob", chat="room")
    result = await fake.say("/forget", user="ann", chat="room")
    assert result.reply == "Forgot 2 messages (yours and the replies to them)."
    conversation = await app.repo.get_or_create_conversation(fake.message("x", chat="room").conversation, is_direct=False)
    history = await app.repo.history(conversation.id)
    assert [m.text for m in history if m.role == "user"] == ["the weather is nice"]
    assert [m.role for m in history] == ["user", "assistant"]
    assert (await fake.say("/forget", user="carl", chat="room")).reply == "There was nothing of yours to forget here."


async def test_edits_pass_the_same_input_rules_as_new_messages(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, bot={"max_input_chars": 500})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        await fake.say("I like tea", addressed=False, message_id="tea")
        conversation = await app.repo.find_conversation(fake.message("x").conversation)

        async def stored() -> str:
            [message] = await app.repo.history(conversation.id)
            return message.text

        assert (await fake.say("x" * 501)).outcome is Outcome.REFUSED  # a new message this long is refused
        huge = ("y\x00\x1b" * 17_000)[:50_000]
        assert await app.router.handle_edit(fake.message(huge, message_id="tea", addressed=False)) is False
        assert await stored() == "I like tea"
        for blank in ("  \u200b\u200c\u200d\u2060\ufeff ", "\x00\x1b"):
            assert await app.router.handle_edit(fake.message(blank, message_id="tea", addressed=False)) is False
        assert await stored() == "I like tea"
        assert await app.router.handle_edit(fake.message(" I\x00 like\x1b coffee\r\n", message_id="tea", addressed=False))
        assert await stored() == "I like coffee"
        assert await app.router.handle_edit(fake.message("broken \ud800 text", message_id="tea", addressed=False))
        assert await stored() == "broken \ufffd text"


async def test_a_message_of_zero_width_characters_is_ignored(bot):
    fake, app = bot
    result = await fake.say("\u200b\u200c\u200d\u2060\ufeff", direct=True, chat="dm")
    assert result.outcome is Outcome.IGNORED
    assert await app.queue.depth() == 0


async def test_commands_count_against_the_message_rate(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, queue={"user_messages_per_minute": 3})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        assert [(await fake.say("/help", user="ann")).outcome for _ in range(3)] == [Outcome.COMMAND] * 3
        flood = await fake.say("/status", user="ann")
        assert flood.outcome is Outcome.BUSY and flood.refusal.kind is RefusalKind.RATE_LIMITED
        assert (await fake.say("/help", user="bob")).outcome is Outcome.COMMAND  # others are not held up


async def test_a_redelivered_command_does_nothing_and_says_nothing(bot):
    fake, app = bot
    await answered(fake, app, "before", direct=True, chat="dm")
    first = await fake.say("/reset", direct=True, chat="dm", message_id="cmd-1")
    assert first.reply.startswith("History cleared (2 messages forgotten)")
    later = await fake.say("after", direct=True, chat="dm")
    for command in ("/reset", "/help", "/system new", "/set temperature=1", "/forget"):
        again = await fake.say(command, direct=True, chat="dm", message_id="cmd-1")
        assert again.outcome is Outcome.DUPLICATE and again.reply is None, command
    assert await app.router.wait_for(later.job_id) == "done"
    conversation = await app.repo.find_conversation(fake.message("x", chat="dm").conversation)
    assert [m.text for m in await app.repo.history(conversation.id)][:1] == ["after"]
    assert [e.action for e in await app.repo.audit_log(conversation.id)] == ["reset"]
    assert (await app.repo.get_conversation(conversation.id)).temperature is None
    # A read-only command takes effect once too.
    assert (await fake.say("/help", direct=True, chat="dm", message_id="cmd-2")).reply
    assert (await fake.say("/help", direct=True, chat="dm", message_id="cmd-2")).outcome is Outcome.DUPLICATE


async def test_storage_errors_never_show_driver_text(bot, monkeypatch):
    fake, app = bot
    from bot.core.errors import StorageError

    async def broken(*args, **kwargs):
        raise StorageError("database error: (sqlite3.IntegrityError) CHECK constraint failed: secret_table")

    monkeypatch.setattr(app.repo, "get_or_create_conversation", broken)
    for text in ("hello", "/status", "/reset"):
        result = await fake.say(text, direct=True, chat="dm")
        assert result.outcome is Outcome.ERROR
        assert "sqlite3" not in result.reply and "secret_table" not in result.reply, result.reply


async def test_adapters_can_list_the_conversations_they_may_have_missed_messages_in(bot):
    fake, app = bot
    await answered(fake, app, "hello", direct=True, chat="dm")
    await fake.say("just talking", chat="group", addressed=False)
    other = FakeAdapter("elsewhere")
    await other.start(fake.core)
    await other.say("not here", chat="group", addressed=False)
    known = {c.key.key: c for c in await fake.core.conversations_on("fake")}
    assert set(known) == {"dm", "group"}
    assert known["dm"].is_direct and not known["group"].is_direct
    dm = await app.repo.find_conversation(known["dm"].key)
    [question, reply] = await app.repo.history(dm.id)
    assert known["dm"].last_message_at == question.created_at  # what people sent; replies do not count
    assert [c.key.key for c in await fake.core.conversations_on("elsewhere")] == ["group"]

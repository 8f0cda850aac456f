"""Telegram end to end: the real python-telegram-bot Application, over HTTP, against a fake Bot
API server on 127.0.0.1 (tests/fakes/telegram_api.py), through Parley's real router, queue,
storage and worker engine (tiny model)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from adapters.telegram import MENU, TEXT_ONLY, TelegramAdapter
from bot.runtime.app import ParleyApp
from bot.core.errors import AdapterError, ConfigError
from bot.runtime.backends import make_generation_client
from bot.core.types import ConversationKey
from tests.fakes.telegram_api import FakeTelegramAPI
from tests.support import jobs_of, make_settings

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "PARLEY_TEST_TELEGRAM_TOKEN"


def telegram_settings(model_dir, tmp_path, fake, **sections):
    telegram = {"enabled": True, "token_env": TOKEN_ENV, "api_base_url": fake.base_url, "edit_interval": 0.05}
    telegram.update(sections.pop("telegram", {}))
    return make_settings(model_dir, tmp_path, telegram=telegram, console={"enabled": False}, **sections)


@pytest.fixture
async def fake(monkeypatch):
    async with FakeTelegramAPI(bot_username="parley_bot") as server:
        monkeypatch.setenv(TOKEN_ENV, server.token)
        yield server


async def start_app(settings, *, in_process=True):
    adapter = TelegramAdapter.from_config(settings)
    client = make_generation_client(settings, in_process=True) if in_process else None
    app = ParleyApp(settings, [adapter], client=client)
    await app.start()
    return app, adapter


@pytest.fixture
async def bot(fake, tiny_model_dir, tmp_path):
    app, adapter = await start_app(telegram_settings(tiny_model_dir, tmp_path, fake))
    try:
        yield app
    finally:
        await app.stop()


async def conversation_of(app, key: str, *, direct: bool):
    return await app.repo.get_or_create_conversation(ConversationKey("telegram", key), is_direct=direct)


async def test_private_exchange_through_the_worker_process(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake, generation={"max_new_tokens": 12})
    app, adapter = await start_app(settings, in_process=False)
    try:
        assert fake.commands["default"] == [{"command": name, "description": text} for name, text in MENU]
        user = fake.make_user("Ada")
        update = fake.add_private_message(user, "Hello bot")
        await fake.wait_for(lambda: fake.sent, timeout=30)
        await app.queue.run_until_empty()
        [sent] = fake.sent
        assert sent.chat_id == user["id"]
        assert sent.message["reply_to_message"]["message_id"] == update["message"]["message_id"]
        assert any(a.action == "typing" and a.chat_id == user["id"] for a in fake.actions)
        conversation = await conversation_of(app, str(user["id"]), direct=True)
        history = await app.repo.history(conversation.id)
        assert [m.role for m in history] == ["user", "assistant"]
        assert history[1].text.split() == fake.messages_in(user["id"])[0].split()
    finally:
        await app.stop()


async def test_group_answers_mentions_and_replies_and_keeps_other_messages_as_context(fake, bot):
    group = fake.make_supergroup()
    ann, bob = fake.make_user("Ann"), fake.make_user("Bob")
    fake.add_group_message(group, ann, "Lunch is at noon today.")
    await fake.wait_until_delivered()
    await asyncio.sleep(0.2)
    assert fake.sent == []  # not addressed: not answered, not sent to the model
    fake.add_group_message(group, bob, "@parley_bot when is lunch?")
    await fake.wait_for(lambda: len(fake.sent) == 1, timeout=20)
    await bot.queue.run_until_empty()
    conversation = await conversation_of(bot, str(group["id"]), direct=False)
    [job] = await jobs_of(bot, conversation.id)
    assert [m["content"] for m in job.prompt[1:]] == ["Ann: Lunch is at noon today.", "Bob: when is lunch?"]
    # A reply to the bot's message is addressed to it too.
    fake.add_group_message(group, ann, "thanks!", reply_to_message_id=fake.sent[0].message_id)
    await fake.wait_for(lambda: len(fake.sent) == 2, timeout=20)
    # /ask works without a mention; commands for another bot are ignored.
    fake.add_group_message(group, ann, "/ask what is two plus two?")
    await fake.wait_for(lambda: len(fake.sent) == 3, timeout=20)
    fake.add_group_message(group, ann, "/status@other_bot")
    fake.add_group_message(group, ann, "/status@parley_bot")
    await fake.wait_for(lambda: len(fake.sent) == 4, timeout=20)
    assert fake.sent[3].text.startswith("Model: ")


async def test_forum_topics_are_separate_conversations(fake, bot):
    forum = fake.make_forum()
    one, two = fake.create_topic(forum, "one"), fake.create_topic(forum, "two")
    user = fake.make_user("Ann")
    fake.add_group_message(forum, user, "@parley_bot hi from one", message_thread_id=one)
    fake.add_group_message(forum, user, "@parley_bot hi from two", message_thread_id=two)
    await fake.wait_for(lambda: len(fake.sent) == 2, timeout=20)
    await bot.queue.run_until_empty()
    assert {s.params.get("message_thread_id") for s in fake.sent} == {one, two}
    for thread in (one, two):
        conversation = await conversation_of(bot, f"{forum['id']}:{thread}", direct=False)
        assert [m.role for m in await bot.repo.history(conversation.id)] == ["user", "assistant"]


async def test_admin_commands_for_administrators_only(fake, bot):
    group = fake.make_supergroup()
    boss, member = fake.make_user("Boss"), fake.make_user("Member")
    fake.set_member_status(group["id"], boss["id"], "administrator")
    fake.set_member_status(group["id"], member["id"], "member")
    for command in ("/system You are a pirate.", "/reset", "/set temperature=1", "/system clear", "/reset new prompt"):
        fake.add_group_message(group, member, command)
    await fake.wait_for(lambda: len(fake.sent) == 5, timeout=10)
    assert all(s.text.startswith("Only admins can use /") for s in fake.sent)
    conversation = await conversation_of(bot, str(group["id"]), direct=False)
    refused = await bot.repo.get_conversation(conversation.id)
    assert refused.system_prompt is None and refused.temperature is None
    fake.add_group_message(group, boss, "/system You are a pirate.")
    await fake.wait_for(lambda: len(fake.sent) == 6, timeout=10)
    assert fake.sent[5].text == "System prompt set: You are a pirate."
    fake.add_group_message(group, member, "@parley_bot ahoy?")
    await fake.wait_for(lambda: len(fake.sent) == 7, timeout=20)
    await bot.queue.run_until_empty()
    [job] = await jobs_of(bot, conversation.id)
    assert job.prompt[0]["content"].startswith("You are a pirate.")
    fake.add_group_message(group, boss, "/reset")
    await fake.wait_for(lambda: len(fake.sent) == 8, timeout=10)
    assert fake.sent[7].text.startswith("History cleared (2 messages forgotten)")
    assert [e.action for e in await bot.repo.audit_log(conversation.id)] == ["system", "reset"]
    assert len(fake.calls_to("getChatMember")) == 2  # cached per user after the first ask


async def test_long_replies_continue_in_further_messages(fake, bot):
    user = fake.make_user("Ann")
    chat = fake.private_chat(user)
    paragraph = "This sentence is part of a long answer about many things. " * 12
    text = "\n\n".join(f"{n}. {paragraph.strip()}" for n in range(12))
    assert len(text) > 2 * 4096
    adapter = bot.adapters["telegram"]
    stream = await adapter.open_reply(ConversationKey("telegram", str(chat["id"])), None)
    for cut in range(500, len(text), 1500):
        await stream.update(text[:cut])
    ids = await stream.finish(text)
    shown = fake.messages_in(chat["id"])
    assert len(ids) == len(shown) == 3
    assert all(len(part) <= 4096 for part in shown)
    assert "".join(" ".join(shown).split()) == "".join(text.split())
    assert all(part.rstrip().endswith(".") for part in shown)  # cut at sentence ends, not mid-word


async def test_streaming_edits_are_throttled_per_chat(fake, bot):
    adapter = bot.adapters["telegram"]
    chat = fake.private_chat(fake.make_user("Ann"))
    stream = await adapter.open_reply(ConversationKey("telegram", str(chat["id"])), None)
    words = [f"word{n}" for n in range(40)]
    for n in range(1, len(words) + 1):
        await stream.update(" ".join(words[:n]))
        await asyncio.sleep(0.005)
    await stream.finish(" ".join(words))
    assert fake.messages_in(chat["id"]) == [" ".join(words)]
    edits = [c for c in fake.calls if c.method.lower() == "editmessagetext"]
    assert 1 <= len(edits) < 20  # streamed, but not one edit per word
    gaps = [b.time - a.time for a, b in zip(edits, edits[1:])]
    assert all(gap >= 0.04 for gap in gaps[:-1])  # the final edit may come at once


async def test_flood_control_is_waited_out(fake, bot):
    user = fake.make_user("Ann")
    fake.fail_next("sendMessage", error_code=429, retry_after=1)
    fake.add_private_message(user, "hi")
    await fake.wait_for(lambda: fake.sent, timeout=20)
    failed = [c for c in fake.calls_to("sendMessage") if not c.ok]
    assert len(failed) == 1 and failed[0].status == 429
    succeeded = [c for c in fake.calls_to("sendMessage") if c.ok]
    assert succeeded[0].time - failed[0].time >= 0.9  # retry_after was honoured
    await bot.queue.run_until_empty()
    conversation = await conversation_of(bot, str(user["id"]), direct=True)
    assert [m.role for m in await bot.repo.history(conversation.id)] == ["user", "assistant"]


async def test_rejected_formatting_falls_back_to_plain_text(fake, bot):
    adapter = bot.adapters["telegram"]
    chat = fake.private_chat(fake.make_user("Ann"))
    fake.fail_next("sendMessage", error_code=400, description="Bad Request: can't parse entities: unsupported start tag")
    stream = await adapter.open_reply(ConversationKey("telegram", str(chat["id"])), None)
    await stream.finish("Some **bold** text")
    sent = fake.calls_to("sendMessage")
    assert [c.ok for c in sent] == [False, True]
    assert sent[1].params.get("parse_mode") in (None, "")
    assert fake.messages_in(chat["id"]) == ["Some **bold** text"]


async def test_a_redelivered_update_is_answered_once(fake, bot):
    user = fake.make_user("Ann")
    update = fake.add_private_message(user, "hello once")
    await fake.wait_for(lambda: fake.sent, timeout=20)
    fake.add_update(update)
    await fake.wait_until_delivered()
    await asyncio.sleep(0.3)
    await bot.queue.run_until_empty()
    assert len(fake.sent) == 1


async def test_non_text_messages_edits_and_other_bots(fake, bot):
    user = fake.make_user("Ann")
    chat = fake.private_chat(user)
    fake.add_photo_message(chat, user)
    await fake.wait_for(lambda: fake.sent, timeout=10)
    assert fake.sent[0].text == TEXT_ONLY
    group = fake.make_supergroup()
    fake.add_sticker_message(group, user)
    robot = fake.make_user("Robot", is_bot=True)
    fake.add_group_message(group, robot, "@parley_bot hello from a bot")
    original = fake.add_group_message(group, user, "I like tea")
    await fake.wait_until_delivered()
    await asyncio.sleep(0.2)
    assert len(fake.sent) == 1  # nothing answered in the group
    fake.add_edited_message(original["message"], "I like coffee")
    await fake.wait_until_delivered()
    conversation = await conversation_of(bot, str(group["id"]), direct=False)
    await fake.wait_for(lambda: True)
    for _ in range(50):
        history = await bot.repo.history(conversation.id)
        if history and history[0].text == "I like coffee":
            break
        await asyncio.sleep(0.05)
    assert [m.text for m in history] == ["I like coffee"]
    assert history[0].edited_at is not None


async def test_missing_or_rejected_token_stops_start_up(fake, tiny_model_dir, tmp_path, monkeypatch):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {TOKEN_ENV} is not set"):
        TelegramAdapter.from_config(settings)
    monkeypatch.setenv(TOKEN_ENV, "123:wrong")
    adapter = TelegramAdapter.from_config(settings)
    with pytest.raises(AdapterError, match=f"rejected the bot token in \\${TOKEN_ENV}"):
        await adapter.start(_NoCore())
    assert "123:wrong" not in str(adapter)


class _NoCore:
    def set_bot_username(self, platform, username):
        raise AssertionError("not reached")


async def test_parley_run_polls_and_stops_on_sigterm(fake, tiny_model_dir, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\nmodel = "{tiny_model_dir}"\ndevice = "cpu"\n'
        f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/p.db"\n'
        f'[telegram]\nenabled = true\ntoken_env = "{TOKEN_ENV}"\napi_base_url = "{fake.base_url}"\n'
        "[console]\nenabled = false\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.runtime.cli", "-v", "-c", str(config), "run",  # DEBUG: the most there is to leak
        cwd=ROOT, env={**os.environ}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await fake.wait_for(lambda: fake.calls_to("getUpdates"), timeout=60)
        user = fake.make_user("Ann")
        fake.add_private_message(user, "hi from a real process")
        await fake.wait_for(lambda: fake.sent, timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert fake.token not in stderr.decode()
    assert "polling as @parley_bot" in stderr.decode()


async def test_an_interrupted_reply_is_finished_by_editing_what_was_posted(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    user = fake.make_user("Ann")
    app, adapter = await start_app(settings)
    try:
        await app.queue.stop()  # the job waits...
        fake.add_private_message(user, "hello")
        await fake.wait_until_delivered()
        await fake.wait_for(lambda: True)
        for _ in range(100):
            [job] = await app.repo.queued_jobs() or [None]
            if job is not None:
                break
            await asyncio.sleep(0.05)
        # ...then an attempt starts, posts part of its reply, and the process dies.
        assert await app.repo.mark_running(job.id, [])
        stream = await adapter.open_reply(ConversationKey("telegram", str(user["id"])), None)
        await stream.update("a partial rep")
        await app.repo.set_reply_platform_ids(job.id, stream.posted_ids)
    finally:
        await app.stop()
    assert len(fake.sent) == 1
    app, adapter = await start_app(settings)  # the restart
    try:
        assert await app.router.wait_for(job.id) == "done"
    finally:
        await app.stop()
    assert len(fake.sent) == 1  # not answered twice
    final = (await _history_texts(settings, user))[-1]
    assert fake.messages_in(user["id"]) == [final] and final != "a partial rep"


async def _history_texts(settings, user):
    from storage import Database, Repository

    async with Database(settings.database_url()) as database:
        repo = Repository(database.sessions)
        conversation = await repo.find_conversation(ConversationKey("telegram", str(user["id"])))
        return [m.text for m in await repo.history(conversation.id)]


async def test_doctor_checks_database_model_and_tokens(fake, tiny_model_dir, tmp_path, monkeypatch):
    from bot.runtime.doctor import run_doctor

    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    lines: list[str] = []
    assert await run_doctor(settings, out=lines.append) == 0
    assert lines[1].startswith("ok      database: ") and "at revision" in lines[1]
    assert lines[2].startswith("ok      model: tiny-model") and "answered" in lines[2]
    assert lines[3] == f"ok      telegram: token in ${TOKEN_ENV} is accepted: @parley_bot"
    monkeypatch.setenv(TOKEN_ENV, "123:wrong")
    lines.clear()
    assert await run_doctor(settings, model=False, out=lines.append) == 1
    assert f"PROBLEM telegram: Telegram rejects the token in ${TOKEN_ENV}" in lines[2]
    assert lines[-1] == "1 problem found"

"""Telegram updates take effect once, whatever happens around them: a crash that makes Telegram
deliver a batch again, a database that is briefly unavailable, a group flooding the bot.

The real python-telegram-bot Application against the loopback fake Bot API
(tests/fakes/telegram_api.py), through Parley's real router, queue, storage and worker engine.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time


from tests.test_telegram import conversation_of, fake, start_app, telegram_settings  # noqa: F401  (fixture)
from tests.support import jobs_of


async def _queued_job(app, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = await app.repo.queued_jobs()
        if jobs:
            return jobs[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no job was queued")


def _texts_in(fake, chat_id: int) -> list[str]:
    return [s.text for s in fake.sent if s.chat_id == chat_id]


async def test_a_batch_replayed_after_a_crash_takes_effect_once(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    user = fake.make_user("Ann")
    app, _ = await start_app(settings)
    try:
        await app.queue.stop()  # the reply waits, so the crash comes before it
        batch = [
            fake.add_private_message(user, "/help"),
            fake.add_private_message(user, "/reset"),
            fake.add_private_message(user, "hello after the reset"),
        ]
        await fake.wait_for(lambda: any(t.startswith("History cleared") for t in _texts_in(fake, user["id"])), timeout=10)
        job = await _queued_job(app)
    finally:
        await app.stop()
    # The crash: Telegram never heard that the batch was handled, and delivers all of it again.
    fake.redeliver(*batch)
    app, _ = await start_app(settings)
    try:
        assert await asyncio.wait_for(app.router.wait_for(job.id), 30) == "done"
        await fake.wait_until_delivered()
        await asyncio.sleep(0.5)  # time for a wrong second answer to show up
        texts = _texts_in(fake, user["id"])
        assert sum(t.startswith("History cleared") for t in texts) == 1, texts
        assert sum("Commands:" in t for t in texts) == 1, texts
        assert len(texts) == 3, texts  # /help, /reset and the one answer to the message
        conversation = await conversation_of(app, str(user["id"]), direct=True)
        history = await app.repo.history(conversation.id)
        assert [(m.role, m.text) for m in history][:1] == [("user", "hello after the reset")]
        assert [m.role for m in history] == ["user", "assistant"]
        assert [e.action for e in await app.repo.audit_log(conversation.id)] == ["reset"]
        assert len(await jobs_of(app, conversation.id)) == 1
    finally:
        await app.stop()


async def test_updates_wait_out_a_storage_outage_and_are_answered_once(
    fake, tiny_model_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr("storage.db.SQLITE_BUSY_TIMEOUT_MS", 200)  # "locked" comes quickly
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    app, _ = await start_app(settings)
    ann, bob = fake.make_user("Ann"), fake.make_user("Bob")
    group = fake.make_supergroup()
    fake.set_member_status(group["id"], bob["id"], "administrator")
    try:
        # Another process holds the write lock past the busy timeout: the database is unavailable.
        lock = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        caplog.set_level(logging.INFO)
        fake.add_private_message(ann, "first while the database is down")
        fake.add_private_message(ann, "second while the database is down")
        fake.add_private_message(bob, "bob while the database is down")
        fake.add_group_message(group, bob, "/system You are a pirate.")
        await asyncio.sleep(2.0)
        assert fake.sent == []  # no driver text, no answer made of an error
        assert fake.pending_updates  # nothing confirmed: Telegram still holds them
        lock.rollback()
        lock.close()
        await fake.wait_for(lambda: len(fake.sent) == 4, timeout=40)
        await app.queue.run_until_empty()
        await asyncio.sleep(0.3)
        assert len(fake.sent) == 4
        assert len(_texts_in(fake, ann["id"])) == 2 and len(_texts_in(fake, bob["id"])) == 1
        assert _texts_in(fake, group["id"]) == ["System prompt set: You are a pirate."]
        assert not any("locked" in s.text or "database" in s.text.lower() for s in fake.sent)
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)  # confirmed once recorded
        conversation = await conversation_of(app, str(ann["id"]), direct=True)
        assert [m.text for m in await app.repo.history(conversation.id) if m.role == "user"] == [
            "first while the database is down",
            "second while the database is down",
        ]
    finally:
        await app.stop()
    outage = [
        r for r in caplog.records
        if r.name in ("parley.telegram", "parley.router") and r.levelno >= logging.WARNING
    ]
    assert len(outage) == 1, [r.getMessage() for r in outage]
    assert "database" in outage[0].getMessage().lower() or "storage" in outage[0].getMessage().lower()


async def test_a_flooding_group_does_not_delay_another_chat(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    app, adapter = await start_app(settings)
    try:
        warm = fake.make_user("Warm")
        fake.add_private_message(warm, "warm up")
        await fake.wait_for(lambda: _texts_in(fake, warm["id"]), timeout=30)
        await app.queue.run_until_empty()
        group = fake.make_supergroup()
        people = [fake.make_user(f"Member{n}") for n in range(13)]
        for n in range(26):  # more than the 20 a minute Telegram lets a bot send to one group
            fake.add_group_message(group, people[n % len(people)], "/help")
        ann = fake.make_user("Ann")
        fake.add_private_message(ann, "are you there?")
        asked = time.monotonic()
        await fake.wait_for(lambda: _texts_in(fake, ann["id"]), timeout=30)
        assert time.monotonic() - asked < 2.0
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)  # every update confirmed
        # Idle chats leave nothing behind; the group's answers wait out its 20 a minute on their own.
        await fake.wait_for(lambda: set(adapter._chats) == {group["id"]}, timeout=10)
        assert not adapter._chats[group["id"]].updates
        assert fake.calls_to("getChatMember") == []  # /help needs no admin check
    finally:
        await app.stop()


async def test_the_offset_confirms_only_updates_below_which_all_are_handled(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    app, _ = await start_app(settings)
    try:
        group, member, ann = fake.make_supergroup(), fake.make_user("Member"), fake.make_user("Ann")
        fake.delay_next("getChatMember", 2.5)  # the group's admin check is slow...
        slow = fake.add_group_message(group, member, "/set temperature=1")
        fast = fake.add_private_message(ann, "hello")
        asked = time.monotonic()
        await fake.wait_for(lambda: _texts_in(fake, ann["id"]), timeout=10)
        assert time.monotonic() - asked < 2.0  # ...and holds up no other chat,
        # but the later update, handled first, is not confirmed past the one still in hand.
        assert [u["update_id"] for u in fake.pending_updates] == [slow["update_id"], fast["update_id"]]
        await fake.wait_for(lambda: _texts_in(fake, group["id"]), timeout=10)
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)
    finally:
        await app.stop()


async def test_anonymous_group_admins_may_use_admin_commands(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    app, _ = await start_app(settings)
    try:
        group = fake.make_supergroup()
        anonymous = fake.anonymous_admin()
        fake.add_group_message(group, anonymous, "/system You are a pirate.", sender_chat=group)
        await fake.wait_for(lambda: fake.sent, timeout=10)
        assert [s.text for s in fake.sent] == ["System prompt set: You are a pirate."]
        conversation = await conversation_of(app, str(group["id"]), direct=False)
        assert (await app.repo.get_conversation(conversation.id)).system_prompt == "You are a pirate."
        # A post of a linked channel (another sender_chat) is not an admin, and other bots stay ignored.
        channel = {"id": -1009999999999, "type": "channel", "title": "News"}
        fake.add_group_message(group, fake.make_user("Channel", is_bot=True), "/system clear", sender_chat=channel)
        fake.add_group_message(group, fake.make_user("Robot", is_bot=True), "/system clear")
        await fake.wait_until_delivered()
        await asyncio.sleep(0.3)
        assert len(fake.sent) == 1
        assert (await app.repo.get_conversation(conversation.id)).system_prompt == "You are a pirate."
    finally:
        await app.stop()


async def test_the_admin_cache_forgets_expired_entries(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake, telegram={"admin_cache_seconds": 0.2})
    app, adapter = await start_app(settings)
    try:
        group = fake.make_supergroup()
        first, second, third = (fake.make_user(name) for name in ("One", "Two", "Three"))
        fake.add_group_message(group, first, "/set temperature=1")
        fake.add_group_message(group, second, "/set temperature=1")
        await fake.wait_for(lambda: len(fake.sent) == 2, timeout=10)
        assert len(adapter._admin_cache) == 2
        await asyncio.sleep(0.3)
        fake.add_group_message(group, third, "/set temperature=1")
        await fake.wait_for(lambda: len(fake.sent) == 3, timeout=10)
        assert list(adapter._admin_cache) == [(group["id"], third["id"])]
    finally:
        await app.stop()


async def test_a_private_photo_is_answered_once_even_when_delivered_again(fake, tiny_model_dir, tmp_path):
    settings = telegram_settings(tiny_model_dir, tmp_path, fake)
    user = fake.make_user("Ann")
    app, _ = await start_app(settings)
    try:
        photo = fake.add_photo_message(fake.private_chat(user), user)
        start = fake.add_private_message(user, "/start")
        await fake.wait_for(lambda: len(fake.sent) == 2, timeout=10)
    finally:
        await app.stop()
    fake.redeliver(photo, start)
    app, _ = await start_app(settings)
    try:
        await fake.wait_until_delivered()
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)
        await asyncio.sleep(0.3)
        assert len(fake.sent) == 2
    finally:
        await app.stop()


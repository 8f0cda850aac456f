"""Discord end to end: the real discord.py client, over a real gateway websocket and REST, against
a fake Discord on 127.0.0.1 (tests/fakes/discord_api.py), through Parley's real router, queue,
storage and worker engine (tiny model)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from adapters.base import EditingReplyStream
from adapters.discord import MAX_LENGTH, TEXT_ONLY, DiscordAdapter
from bot.runtime.app import ParleyApp
from bot.core.errors import AdapterError, ConfigError
from bot.runtime.backends import make_generation_client
from bot.core.types import ConversationKey
from tests.fakes.discord_api import FakeDiscord, Permission
from tests.support import jobs_of, make_settings

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "PARLEY_TEST_DISCORD_TOKEN"


@pytest.fixture
async def fake(monkeypatch):
    async with FakeDiscord(heartbeat_interval=0.5) as server:
        with server.patch_discord():
            monkeypatch.setenv(TOKEN_ENV, server.token)
            yield server


class World:
    def __init__(self, fake: FakeDiscord) -> None:
        self.admin, self.member = fake.add_user("alice"), fake.add_user("bob")
        self.guild = fake.add_guild("Parley Lab", owner=fake.owner_user)
        self.mods = fake.add_role(self.guild, "Mods", Permission.MANAGE_GUILD)
        fake.add_member(self.guild, self.admin, [self.mods])
        fake.add_member(self.guild, self.member)
        self.general = fake.add_text_channel(self.guild, "general")
        self.lobby = fake.add_text_channel(self.guild, "lobby")
        self.thread = fake.add_thread(self.general, "side-chat", owner=self.admin)


@pytest.fixture
def world(fake):
    return World(fake)


def discord_settings(model_dir, tmp_path, world, **sections):
    discord = {
        "enabled": True,
        "token_env": TOKEN_ENV,
        "guild_ids": [int(world.guild["id"])],
        "channel_ids": [int(world.lobby["id"])],
        "edit_interval": 0.05,
        "ready_timeout": 10,
    }
    discord.update(sections.pop("discord", {}))
    return make_settings(model_dir, tmp_path, discord=discord, console={"enabled": False}, **sections)


async def start_app(settings, *, in_process=True):
    adapter = DiscordAdapter.from_config(settings, guild_ready_timeout=0.05)
    client = make_generation_client(settings, in_process=True) if in_process else None
    app = ParleyApp(settings, [adapter], client=client)
    await app.start()
    return app


@pytest.fixture
async def bot(fake, world, tiny_model_dir, tmp_path):
    app = await start_app(discord_settings(tiny_model_dir, tmp_path, world))
    try:
        yield app
    finally:
        await app.stop()


def pings_nobody(allowed_mentions) -> bool:
    """Discord's allowed_mentions that let no @everyone, role, user or replied-to author be pinged."""
    return (
        allowed_mentions is not None
        and allowed_mentions.get("parse") == []
        and not allowed_mentions.get("users")
        and not allowed_mentions.get("roles")
        and not allowed_mentions.get("replied_user", False)
    )


def bot_messages(fake, channel):
    return [m for m in fake.messages_in(channel) if m.kind != "interaction" and not m.deleted]


async def history_of(app, channel, *, direct=False):
    conversation = await app.repo.get_or_create_conversation(ConversationKey("discord", str(channel["id"])), is_direct=direct)
    return conversation, await app.repo.history(conversation.id)


async def test_a_mention_is_answered_through_the_worker_process(fake, world, tiny_model_dir, tmp_path):
    settings = discord_settings(tiny_model_dir, tmp_path, world, generation={"max_new_tokens": 12})
    app = await start_app(settings, in_process=False)
    try:
        synced = {c["name"] for c in fake.synced_commands[int(world.guild["id"])]}
        assert synced == {"help", "reset", "system", "set", "status", "model", "forget", "audit", "export"}
        admin_only = {c["name"]: c.get("default_member_permissions") for c in fake.synced_commands[int(world.guild["id"])]}
        assert admin_only["reset"] == admin_only["audit"] == str(int(Permission.MANAGE_GUILD))
        # Everyone may look (/system show, /set alone); the bot refuses a non-admin's change itself.
        assert admin_only["help"] is None and admin_only["status"] is None
        assert admin_only["system"] is None and admin_only["set"] is None
        asked = await fake.send_user_message(
            world.general, world.member, f"{fake.mention(fake.bot_user)} hello there", mentions=[fake.bot_user]
        )
        await fake.wait_for(lambda: bot_messages(fake, world.general), timeout=30)
        await app.queue.run_until_empty()
        [reply] = bot_messages(fake, world.general)
        assert str(reply.message_reference["message_id"]) == asked["id"]
        assert pings_nobody(reply.allowed_mentions) and reply.pinged_user_ids == ()
        assert any(t.channel_id == int(world.general["id"]) for t in fake.typing)
        conversation, history = await history_of(app, world.general)
        assert [(m.role, m.text) for m in history] == [("user", "hello there"), ("assistant", reply.content)]
    finally:
        await app.stop()


async def test_other_messages_are_context_only_and_bots_are_ignored(fake, world, bot):
    await fake.send_user_message(world.general, world.member, "the deploy is on friday")
    robot = fake.add_user("robot", bot=True)
    fake.add_member(world.guild, robot)
    await fake.send_user_message(world.general, robot, f"{fake.mention(fake.bot_user)} hi", mentions=[fake.bot_user])
    await asyncio.sleep(0.3)
    assert bot_messages(fake, world.general) == []
    await fake.send_user_message(world.general, world.admin, f"<@{fake.bot_id}> when is the deploy?", mentions=[fake.bot_user])
    await fake.wait_for(lambda: bot_messages(fake, world.general), timeout=20)
    await bot.queue.run_until_empty()
    conversation, _ = await history_of(bot, world.general)
    [job] = await jobs_of(bot, conversation.id)
    assert [m["content"] for m in job.prompt[1:]] == ["bob: the deploy is on friday", "alice: when is the deploy?"]


async def test_configured_channels_dms_threads_and_replies(fake, world, bot):
    await fake.send_user_message(world.lobby, world.member, "anyone here?")  # a configured channel
    await fake.wait_for(lambda: bot_messages(fake, world.lobby), timeout=20)
    dm = await fake.dm(world.member, "hi in private")
    await fake.wait_for(lambda: bot_messages(fake, fake.dm_channel(world.member)), timeout=20)
    await fake.send_user_message(world.thread, world.member, f"<@{fake.bot_id}> thread talk", mentions=[fake.bot_user])
    await fake.wait_for(lambda: bot_messages(fake, world.thread), timeout=20)
    await bot.queue.run_until_empty()
    # A reply to the bot's message is addressed to it.
    [answer] = bot_messages(fake, world.thread)
    await fake.send_user_message(world.thread, world.admin, "and a follow-up", reply_to=answer.id)
    await fake.wait_for(lambda: len(bot_messages(fake, world.thread)) == 2, timeout=20)
    await bot.queue.run_until_empty()
    _, thread_history = await history_of(bot, world.thread)
    _, channel_history = await history_of(bot, world.general)
    assert [m.text for m in thread_history if m.role == "user"] == ["thread talk", "and a follow-up"]
    assert channel_history == []  # the thread is its own conversation
    _, dm_history = await history_of(bot, fake.dm_channel(world.member), direct=True)
    assert [m.text for m in dm_history if m.role == "user"] == [dm["content"]]


async def test_admin_slash_commands_refused_for_members(fake, world, bot):
    general = int(world.general["id"])
    await fake.invoke_command("system", [{"type": 1, "name": "set", "options": [{"type": 3, "name": "text", "value": "You are a pirate."}]}], user=world.member, channel_id=general)
    await fake.invoke_command("reset", user=world.member, channel_id=general)
    await fake.invoke_command("set", {"temperature": 1.5}, user=world.member, channel_id=general)
    responses = await fake.wait_for(lambda: fake.interaction_responses if len(fake.interaction_responses) == 3 else None, timeout=10)
    assert all(r.ephemeral and r.content.startswith("Only admins can use /") for r in responses)
    conversation, _ = await history_of(bot, world.general)
    after = await bot.repo.get_conversation(conversation.id)
    assert after.system_prompt is None and after.temperature is None
    await fake.invoke_command("system", [{"type": 1, "name": "set", "options": [{"type": 3, "name": "text", "value": "You are a pirate."}]}], user=world.admin, channel_id=general)
    response = await fake.wait_for(lambda: fake.interaction_responses[3:], timeout=10)
    assert response[0].content == "System prompt set: You are a pirate." and not response[0].ephemeral
    await fake.send_user_message(world.general, world.member, f"<@{fake.bot_id}> ahoy?", mentions=[fake.bot_user])
    await fake.wait_for(lambda: bot_messages(fake, world.general), timeout=20)
    await bot.queue.run_until_empty()
    [job] = await jobs_of(bot, conversation.id)
    assert job.prompt[0]["content"].startswith("You are a pirate.")
    await fake.invoke_command("reset", user=world.admin, channel_id=general)
    response = await fake.wait_for(lambda: fake.interaction_responses[4:], timeout=10)
    assert response[0].content.startswith("History cleared (2 messages forgotten)")
    await fake.invoke_command("status", user=world.member, channel_id=general)
    response = await fake.wait_for(lambda: fake.interaction_responses[5:], timeout=10)
    assert response[0].ephemeral and response[0].content.startswith("Model: ")
    assert [e.action for e in await bot.repo.audit_log(conversation.id)] == ["system", "reset"]


async def test_long_replies_split_and_code_blocks_stay_closed(fake, world, bot):
    adapter = bot.adapters["discord"]
    code = "\n".join(f"    value_{n} = compute({n})" for n in range(200))
    text = "Here is the code you asked for. " * 5 + "\n\n```python\n" + code + "\n```\n\n" + "That is all. " * 3
    assert len(text) > 2 * MAX_LENGTH
    stream = await adapter.open_reply(ConversationKey("discord", str(world.general["id"])), None)
    for cut in range(300, len(text), 900):
        await stream.update(text[:cut])
    ids = await stream.finish(text)
    shown = [m.content for m in bot_messages(fake, world.general)]
    assert len(shown) == len(ids) >= 3
    assert all(len(part) <= MAX_LENGTH for part in shown)
    assert all(part.count("```") % 2 == 0 for part in shown)
    assert all(pings_nobody(m.allowed_mentions) and m.pinged_user_ids == () for m in bot_messages(fake, world.general))
    def without_fences(markdown: str) -> str:
        return "".join(markdown.replace("```python\n", "").replace("```", "").split())

    assert without_fences("".join(shown)) == without_fences(text)


async def test_streaming_edits_and_everyone_pings_nobody(fake, world, bot):
    adapter = bot.adapters["discord"]
    stream = await adapter.open_reply(ConversationKey("discord", str(world.general["id"])), None)
    words = ["@everyone", "and", "@here", "and", f"<@{world.member['id']}>", "and", f"<@&{world.mods['id']}>"] * 4
    for n in range(1, len(words) + 1):
        await stream.update(" ".join(words[:n]))
        await asyncio.sleep(0.005)
    await stream.finish(" ".join(words))
    [message] = bot_messages(fake, world.general)
    assert message.content == " ".join(words)
    assert 2 <= len(message.revisions) < len(words)  # streamed by edits, throttled
    assert message.pinged_user_ids == ()
    assert all(pings_nobody(e.payload.get("allowed_mentions")) for e in fake.edits)


async def test_a_rate_limited_send_still_ends_in_the_reply(fake, world, bot):
    failure = fake.fail_next("POST", f"/channels/{world.general['id']}/messages", status=429, retry_after=0.3)
    await fake.send_user_message(world.general, world.member, f"<@{fake.bot_id}> hi", mentions=[fake.bot_user])
    await fake.wait_for(lambda: bot_messages(fake, world.general), timeout=20)
    await bot.queue.run_until_empty()
    assert failure.hits == 1
    _, history = await history_of(bot, world.general)
    assert [m.role for m in history] == ["user", "assistant"]


async def test_attachments_edits_and_deletes(fake, world, bot):
    await fake.dm(world.member, "", attachments=[{"filename": "cat.png", "data": b"\x89PNG", "content_type": "image/png"}])
    dm_channel = fake.dm_channel(world.member)
    await fake.wait_for(lambda: bot_messages(fake, dm_channel), timeout=10)
    assert bot_messages(fake, dm_channel)[0].content == TEXT_ONLY
    await fake.send_user_message(world.general, world.member, "", attachments=[{"filename": "a.txt", "data": b"x"}])
    first = await fake.send_user_message(world.general, world.member, "I like tea")
    second = await fake.send_user_message(world.general, world.member, "and biscuits")
    await fake.edit_user_message(first, "I like coffee")
    await fake.delete_user_message(second)
    conversation, _ = await history_of(bot, world.general)
    for _ in range(100):
        history = await bot.repo.history(conversation.id)
        if [m.text for m in history] == ["I like coffee"]:
            break
        await asyncio.sleep(0.05)
    assert [m.text for m in history] == ["I like coffee"]
    assert bot_messages(fake, world.general) == []


async def test_a_gateway_reconnect_loses_no_accepted_job(fake, world, tiny_model_dir, tmp_path):
    settings = discord_settings(tiny_model_dir, tmp_path, world, generation={"max_new_tokens": 200})
    app = await start_app(settings)
    try:
        await fake.send_user_message(world.lobby, world.member, "tell me a story")
        await fake.disconnect_gateway(code=4000)
        await fake.wait_for(lambda: bot_messages(fake, world.lobby), timeout=30)
        await app.queue.run_until_empty()
        await fake.send_user_message(world.lobby, world.member, "still there?")  # arrives after the resume
        await fake.wait_for(lambda: len(bot_messages(fake, world.lobby)) == 2, timeout=30)
        await app.queue.run_until_empty()
        assert len(fake.resume_payloads) >= 1
        _, history = await history_of(app, world.lobby)
        assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    finally:
        await app.stop()


async def test_missing_or_rejected_token_stops_start_up(fake, world, tiny_model_dir, tmp_path, monkeypatch):
    settings = discord_settings(tiny_model_dir, tmp_path, world)
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ConfigError, match=f"environment variable {TOKEN_ENV} is not set"):
        DiscordAdapter.from_config(settings)
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    adapter = DiscordAdapter.from_config(settings, guild_ready_timeout=0.05)
    with pytest.raises(AdapterError, match=f"rejected the bot token in \\${TOKEN_ENV}"):
        await adapter.start(None)  # type: ignore[arg-type]


async def test_parley_run_connects_and_stops_on_sigterm(fake, world, tiny_model_dir, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\nmodel = "{tiny_model_dir}"\ndevice = "cpu"\n'
        f'[storage]\nurl = "sqlite+aiosqlite:///{tmp_path}/p.db"\n'
        f'[discord]\nenabled = true\ntoken_env = "{TOKEN_ENV}"\nchannel_ids = [{world.lobby["id"]}]\n'
        "[console]\nenabled = false\n"
    )
    # The child process reaches the fake through the same patch, applied by a small launcher.
    launcher = (
        "import sys, yarl, discord\n"
        f"discord.http.Route.BASE = {fake.api_base!r}\n"
        f"discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL({fake.gateway_url!r})\n"
        "import bot.runtime.cli\n"
        "sys.exit(bot.runtime.cli.main(sys.argv[1:]))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", launcher, "-v", "-c", str(config), "run",  # DEBUG: the most there is to leak
        cwd=ROOT, env={**os.environ}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await fake.wait_for(lambda: fake.identify_payloads, timeout=60)
        await asyncio.sleep(0.5)
        await fake.send_user_message(world.lobby, world.member, "hi from a real process")
        await fake.wait_for(lambda: bot_messages(fake, world.lobby), timeout=60)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert fake.token not in stderr.decode()


async def test_a_slow_command_is_deferred_then_answered(fake, world, bot, monkeypatch):
    import adapters.discord as discord_adapter

    monkeypatch.setattr(discord_adapter, "ANSWER_WITHIN", 0.05)  # as if storage were slow today
    adapter = bot.adapters["discord"]
    real_handle = adapter.core.handle

    async def slow_handle(message):
        await asyncio.sleep(0.3)
        return await real_handle(message)

    monkeypatch.setattr(adapter.core, "handle", slow_handle)
    await fake.invoke_command("status", user=world.member, channel_id=int(world.general["id"]))
    await fake.wait_for(lambda: fake.followups and fake.followups[0].content, timeout=10)
    [response] = fake.interaction_responses
    assert response.type == 5 and response.ephemeral  # deferred, "thinking", only for the caller
    assert fake.followups[0].content.startswith("Model: ")


async def test_a_refused_final_edit_is_tried_again(fake, world, bot):
    adapter = bot.adapters["discord"]
    stream = await adapter.open_reply(ConversationKey("discord", str(world.general["id"])), None)
    await stream.update("Hello")
    refused = fake.fail_next("PATCH", f"/channels/{world.general['id']}/messages/*", status=403)
    ids = await stream.finish("Hello world")
    [message] = bot_messages(fake, world.general)
    assert message.content == "Hello world" and ids == [str(message.id)]
    assert refused.hits == 1


async def test_refused_edits_end_in_a_new_message_and_the_reply_is_stored(fake, world, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(EditingReplyStream, "retry_delays", (0.05, 0.05))
    settings = discord_settings(tiny_model_dir, tmp_path, world, generation={"max_new_tokens": 30})
    app = await start_app(settings)
    try:
        refused = fake.fail_next("PATCH", f"/channels/{world.general['id']}/messages/*", status=403, times=1_000)
        asked = await fake.send_user_message(world.general, world.member, f"<@{fake.bot_id}> hi", mentions=[fake.bot_user])
        await fake.wait_for(lambda: bot_messages(fake, world.general), timeout=20)
        await app.queue.run_until_empty()
        conversation, history = await history_of(app, world.general)
        [job] = await jobs_of(app, conversation.id)
        assert job.status == "done", job.error
        assert [m.role for m in history] == ["user", "assistant"]
        assert refused.hits >= 1  # the reply streamed, and its edits were refused
        first, final = bot_messages(fake, world.general)
        assert final.content == history[1].text != first.content  # shown in full, as a new message
        assert str(final.message_reference["message_id"]) == asked["id"]
        assert job.reply_platform_ids == [str(final.id)]
    finally:
        await app.stop()


async def test_channel_locks_do_not_pile_up(fake, world, bot):
    adapter = bot.adapters["discord"]
    channels = [fake.add_text_channel(world.guild, f"room-{n}") for n in range(5)]
    for channel in channels:
        await fake.send_user_message(channel, world.member, "just talking")
    conversation_of = [ConversationKey("discord", str(c["id"])) for c in channels]

    async def all_recorded() -> bool:
        for key in conversation_of:
            found = await bot.repo.find_conversation(key)
            if found is None or not await bot.repo.history(found.id):
                return False
        return True

    for _ in range(200):
        if await all_recorded():
            break
        await asyncio.sleep(0.02)
    assert await all_recorded()
    assert adapter._channel_locks == {}


def catching_up(app):
    """Wait until the Discord adapter has caught up with what it missed."""
    return asyncio.wait_for(app.adapters["discord"].caught_up.wait(), 30)


async def test_messages_sent_while_the_bot_was_down_are_answered_once(fake, world, tiny_model_dir, tmp_path):
    settings = discord_settings(tiny_model_dir, tmp_path, world, discord={"catch_up_minutes": 10})
    dm = fake.dm_channel(world.member)
    app = await start_app(settings)
    try:  # the bot knows #general and the DM
        await fake.send_user_message(world.general, world.admin, "morning all", age=30 * 60)
        await fake.dm(world.member, "hello bot")
        await fake.wait_for(lambda: bot_messages(fake, dm), timeout=20)
        await app.queue.run_until_empty()
    finally:
        await app.stop()
    # While it is down:
    old = await fake.send_user_message(
        world.general, world.admin, f"<@{fake.bot_id}> an old question", mentions=[fake.bot_user], age=20 * 60, deliver=False
    )
    mention = await fake.send_user_message(
        world.general, world.member, f"<@{fake.bot_id}> are you back?", mentions=[fake.bot_user], deliver=False
    )
    await fake.send_user_message(world.general, world.member, "just chatting", deliver=False)
    direct = await fake.dm(world.member, "did you miss me?", deliver=False)

    app = await start_app(settings)
    try:
        await catching_up(app)
        await app.queue.run_until_empty()
        answers = bot_messages(fake, world.general)
        assert [str(m.message_reference["message_id"]) for m in answers] == [mention["id"]]
        dm_answers = [m for m in bot_messages(fake, dm) if m.message_reference]
        assert [str(m.message_reference["message_id"]) for m in dm_answers][-1] == direct["id"]
        general, history = await history_of(app, world.general)
        assert [(m.role, m.text) for m in history] == [
            ("user", "morning all"),
            ("user", "an old question"),  # older than catch_up_minutes: context only
            ("user", "are you back?"),
            ("user", "just chatting"),
            ("assistant", answers[0].content),
        ]
        [job] = await jobs_of(app, general.id)
        assert job.status == "done"
        conversation, dm_history = await history_of(app, dm, direct=True)
        assert [m.text for m in dm_history if m.role == "user"] == ["hello bot", "did you miss me?"]
        assert len(await jobs_of(app, conversation.id)) == 2
        assert old["id"] not in {str(m.message_reference["message_id"]) for m in fake.messages if m.message_reference}
    finally:
        await app.stop()

    shown = len(fake.messages)
    app = await start_app(settings)  # and once more: nothing new to answer
    try:
        await catching_up(app)
        await app.queue.run_until_empty()
        assert len(fake.messages) == shown
        assert len(await jobs_of(app, general.id)) == 1 and len(await jobs_of(app, conversation.id)) == 2
        assert len((await history_of(app, world.general))[1]) == 5
    finally:
        await app.stop()


async def test_a_session_that_could_not_resume_catches_up(fake, world, bot, monkeypatch):
    from adapters.discord import _Client

    async def identify_at_once(self, shard_id, *, initial=False):  # discord.py waits 5 s otherwise
        return None

    monkeypatch.setattr(_Client, "before_identify_hook", identify_at_once)
    adapter = bot.adapters["discord"]
    await catching_up(bot)
    dm = fake.dm_channel(world.member)
    await fake.dm(world.member, "hello bot")
    await fake.wait_for(lambda: bot_messages(fake, dm), timeout=20)
    await bot.queue.run_until_empty()
    runs = adapter.catch_up_runs
    await fake.disconnect_gateway(code=4000)  # resumed: nothing was missed
    await fake.wait_for(lambda: fake.resume_payloads, timeout=10)
    await fake.send_user_message(world.lobby, world.member, "still there?")
    await fake.wait_for(lambda: bot_messages(fake, world.lobby), timeout=20)
    await bot.queue.run_until_empty()
    assert adapter.catch_up_runs == runs
    await fake.disconnect_gateway(code=4000, invalidate_session=True)
    missed = await fake.dm(world.member, "are you there?", deliver=False)
    await fake.wait_for(lambda: adapter.catch_up_runs > runs and adapter.caught_up.is_set(), timeout=20)
    await bot.queue.run_until_empty()
    replied_to = [str(m.message_reference["message_id"]) for m in bot_messages(fake, dm)]
    assert replied_to.count(missed["id"]) == 1

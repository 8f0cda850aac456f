"""The audit trail in chat and on the command line, and a person's own data (/export,
`parley forget-conversation`): through FakeAdapter, and through the real python-telegram-bot and
discord.py clients against their loopback fakes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.discord import DiscordAdapter
from adapters.fake import FakeAdapter
from adapters.telegram import TelegramAdapter
from bot.conversation import messages
from bot.core.contracts import Outcome, RefusalKind
from bot.core.types import ConversationKey, JobStatus
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from storage import Database, HandledUpdate, Repository
from tests.fakes.discord_api import FakeDiscord, Permission
from tests.fakes.telegram_api import FakeTelegramAPI
from tests.support import make_settings

ROOT = Path(__file__).resolve().parent.parent
TELEGRAM_TOKEN_ENV = "PARLEY_TEST_TELEGRAM_TOKEN"
DISCORD_TOKEN_ENV = "PARLEY_TEST_DISCORD_TOKEN"


@pytest.fixture
async def fake_bot(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path)
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=make_generation_client(settings, in_process=True)) as app:
        yield fake, app


async def answered(fake, app, text, **kwargs):
    result = await fake.say(text, **kwargs)
    assert result.outcome is Outcome.QUEUED, result
    assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
    return result


def exported(data: bytes) -> list[tuple[str, str | None]]:
    document = json.loads(data)
    return [(m["text"], m["reply"]["text"] if m["reply"] else None) for m in document["messages"]]


# -- /audit -----------------------------------------------------------------------------------------


async def test_audit_shows_a_system_change_with_its_old_and_new_value(fake_bot):
    fake, app = fake_bot
    assert (await fake.say("/system Be brief.", user="boss", admin=True)).reply.startswith("System prompt set")
    await fake.say("/system Be kind.", user="boss", admin=True)
    await fake.say("/set temperature=0.5", user="boss", admin=True)
    result = await fake.say("/audit", user="boss", admin=True)
    assert result.outcome is Outcome.COMMAND and result.private
    lines = result.reply.splitlines()
    assert lines[0] == "The last 3 admin actions here, newest first:"
    assert lines[1].endswith("Boss /set: temperature=default → temperature=0.5")
    assert lines[2].endswith("Boss /system: 'Be brief.' → 'Be kind.'")
    assert lines[3].endswith("Boss /system: (default) → 'Be brief.'")
    refused = await fake.say("/audit", user="member")
    assert refused.refusal is not None and refused.refusal.kind is RefusalKind.NOT_ADMIN and refused.private
    assert refused.reply == "Only admins can use /audit here. Nothing was changed."
    # In a direct chat the user is the admin of their own conversation.
    assert (await fake.say("/audit", user="member", direct=True, chat="dm")).reply == messages.NO_AUDIT


def test_parley_audit_prints_old_and_new_values(tmp_path):
    db = tmp_path / "parley.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\nurl = "sqlite+aiosqlite:///{db}"\n')

    async def seed() -> None:
        database = Database(f"sqlite+aiosqlite:///{db}")
        await database.start()
        try:
            repo = Repository(database.sessions)
            group = await repo.get_or_create_conversation(ConversationKey("telegram", "-1001"), is_direct=False)
            other = await repo.get_or_create_conversation(ConversationKey("discord", "77"), is_direct=False)
            await repo.set_system_prompt(group.id, "Be brief.", handled=HandledUpdate("telegram", "-1001", "1", "9", "Boss"))
            await repo.set_system_prompt(group.id, "", handled=HandledUpdate("telegram", "-1001", "2", "9", "Boss"))
            await repo.set_generation(other.id, top_p=0.5, handled=HandledUpdate("discord", "77", "3", "8", "Mod"))
        finally:
            await database.stop()

    asyncio.run(seed())
    env = {**os.environ, "PARLEY_CONFIG": ""}

    def parley(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bot.runtime.cli", "-c", str(config), *args],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )

    run = parley("audit", "--conversation", "telegram:-1001")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("Boss /system: 'Be brief.' → (none)")
    assert lines[1].endswith("Boss /system: (default) → 'Be brief.'")
    everything = parley("audit").stdout.splitlines()
    assert len(everything) == 3 and "Mod in discord:77 /set: top_p=default → top_p=0.5" in everything[0]
    assert parley("audit", "--since", "2999-01-01").stdout.strip() == "no admin actions recorded since then"
    # forget-conversation deletes the whole conversation, its audit rows included.
    run = parley("forget-conversation", "telegram:-1001")
    assert run.returncode == 0 and "2 audit entries" in run.stdout, run.stdout + run.stderr
    assert parley("audit", "--conversation", "telegram:-1001").returncode == 1
    assert len(parley("audit").stdout.splitlines()) == 1


# -- /export through FakeAdapter ------------------------------------------------------------------


async def test_export_holds_the_callers_messages_and_replies_only(fake_bot, tmp_path):
    fake, app = fake_bot
    await answered(fake, app, "alice asks one", user="alice")
    await answered(fake, app, "bob asks", user="bob")
    await fake.say("alice says something in passing", user="alice", addressed=False)
    await answered(fake, app, "alice asks two", user="alice")
    result = await fake.say("/export", user="alice")
    assert result.private and result.attachment is not None
    assert result.attachment.filename.endswith(".json")
    replies = {r.reply_to: r.text for r in fake.replies_in("chat")}
    rows = exported(result.attachment.data)
    assert [text for text, _ in rows] == ["alice asks one", "alice says something in passing", "alice asks two"]
    assert rows[1][1] is None and rows[0][1] in replies.values() and rows[2][1] in replies.values()
    assert all("bob" not in text for text, _ in rows)
    assert json.loads(result.attachment.data)["author"]["id"] == "alice"
    assert fake.files == [(ConversationKey("fake", "chat"), result.attachment)]
    # Once per ten minutes per user; someone else may export meanwhile.
    again = await fake.say("/export", user="alice")
    assert again.attachment is None and again.reply.startswith("You can export once every 10 minutes")
    bobs = await fake.say("/export", user="bob")
    assert [text for text, _ in exported(bobs.attachment.data)] == ["bob asks"]
    assert (await fake.say("/export", user="carol")).reply == messages.NOTHING_TO_EXPORT
    # Exports are not admin actions: /audit leaves them out.
    assert (await fake.say("/audit", user="boss", admin=True)).reply == messages.NO_AUDIT


async def test_export_in_the_terminal_is_a_file_path(fake_bot, tmp_path):
    from adapters.console import ConsoleAdapter

    fake, app = fake_bot
    await answered(fake, app, "hello from the terminal", user="ada", chat="work", direct=True)
    result = await fake.say("/export", user="ada", chat="work", direct=True)
    with open(os.devnull) as stdin, open(os.devnull, "w") as stdout:
        console = ConsoleAdapter(stdin=stdin, stdout=stdout, export_dir=tmp_path / "exports")
        path = console._save(result.attachment)
    assert path.parent == tmp_path / "exports" and path.stat().st_mode & 0o077 == 0
    assert [text for text, _ in exported(path.read_bytes())] == ["hello from the terminal"]


# -- Telegram ---------------------------------------------------------------------------------------


@pytest.fixture
async def telegram(monkeypatch, tiny_model_dir, tmp_path):
    async with FakeTelegramAPI(bot_username="parley_bot") as server:
        monkeypatch.setenv(TELEGRAM_TOKEN_ENV, server.token)
        telegram = {"enabled": True, "token_env": TELEGRAM_TOKEN_ENV, "api_base_url": server.base_url, "edit_interval": 0.05}
        settings = make_settings(tiny_model_dir, tmp_path, telegram=telegram, console={"enabled": False})
        adapter = TelegramAdapter.from_config(settings)
        app = ParleyApp(settings, [adapter], client=make_generation_client(settings, in_process=True))
        await app.start()
        try:
            yield server, app, adapter
        finally:
            await app.stop()


async def test_telegram_audit_for_admins_and_export_in_private(telegram):
    fake, app, adapter = telegram
    assert adapter.connected
    group = fake.make_supergroup()
    boss, member = fake.make_user("Boss"), fake.make_user("Member")
    fake.set_member_status(group["id"], boss["id"], "administrator")
    fake.set_member_status(group["id"], member["id"], "member")
    fake.add_group_message(group, boss, "/system Be brief.")
    await fake.wait_for(lambda: len(fake.sent) == 1, timeout=10)
    fake.add_group_message(group, member, "/audit")
    await fake.wait_for(lambda: len(fake.sent) == 2, timeout=10)
    assert fake.sent[1].text == "Only admins can use /audit here. Nothing was changed."
    fake.add_group_message(group, boss, "/audit")
    await fake.wait_for(lambda: len(fake.sent) == 3, timeout=10)
    assert fake.sent[2].text.splitlines()[1].endswith("Boss /system: (default) → 'Be brief.'")
    # In a group, /export sends no file: it asks for a private chat.
    fake.add_group_message(group, member, "@parley_bot remember this, group")
    fake.add_group_message(group, member, "/export")
    await fake.wait_for(lambda: any(s.text == messages.EXPORT_IN_PRIVATE for s in fake.sent), timeout=20)
    # In private: the file, with the caller's messages of that chat and the replies to them.
    other = fake.make_user("Other")
    fake.add_private_message(other, "not yours")
    fake.add_private_message(member, "what is two plus two?")
    await fake.wait_for(lambda: len([s for s in fake.sent if s.chat_id in (member["id"], other["id"])]) >= 2, timeout=30)
    await app.queue.run_until_empty()
    fake.add_private_message(member, "/export")
    [document] = await fake.wait_for(lambda: fake.documents, timeout=10)
    assert document.params["chat_id"] == member["id"] and document.filename.endswith(".json")
    assert document.message["caption"].startswith("Your 1 message here and 1 reply to them")
    conversation = await app.repo.find_conversation(ConversationKey("telegram", str(member["id"])))
    [question, reply] = await app.repo.history(conversation.id)
    assert exported(document.data) == [("what is two plus two?", reply.text)]
    assert not fake.documents[1:]


# -- Discord ----------------------------------------------------------------------------------------


@pytest.fixture
async def discord_bot(monkeypatch, tiny_model_dir, tmp_path):
    async with FakeDiscord(heartbeat_interval=0.5) as server:
        with server.patch_discord():
            monkeypatch.setenv(DISCORD_TOKEN_ENV, server.token)
            admin, member = server.add_user("alice"), server.add_user("bob")
            guild = server.add_guild("Parley Lab", owner=server.owner_user)
            mods = server.add_role(guild, "Mods", Permission.MANAGE_GUILD)
            server.add_member(guild, admin, [mods])
            server.add_member(guild, member)
            general = server.add_text_channel(guild, "general")
            discord = {
                "enabled": True, "token_env": DISCORD_TOKEN_ENV, "guild_ids": [int(guild["id"])],
                "channel_ids": [int(general["id"])], "edit_interval": 0.05, "ready_timeout": 10,
            }
            settings = make_settings(tiny_model_dir, tmp_path, discord=discord, console={"enabled": False})
            adapter = DiscordAdapter.from_config(settings, guild_ready_timeout=0.05)
            app = ParleyApp(settings, [adapter], client=make_generation_client(settings, in_process=True))
            await app.start()
            try:
                yield server, app, adapter, (admin, member, general)
            finally:
                await app.stop()
            assert not adapter.connected


async def test_discord_audit_for_admins_and_export_as_an_ephemeral_file(discord_bot):
    fake, app, adapter, (admin, member, general) = discord_bot
    assert adapter.connected
    channel = int(general["id"])
    system = [{"type": 1, "name": "set", "options": [{"type": 3, "name": "text", "value": "Be brief."}]}]
    await fake.invoke_command("system", system, user=admin, channel_id=channel)
    await fake.wait_for(lambda: fake.interaction_responses, timeout=10)
    await fake.invoke_command("audit", user=member, channel_id=channel)
    responses = await fake.wait_for(lambda: fake.interaction_responses if len(fake.interaction_responses) == 2 else None, timeout=10)
    assert responses[1].ephemeral and responses[1].content == "Only admins can use /audit here. Nothing was changed."
    await fake.invoke_command("audit", user=admin, channel_id=channel)
    [shown] = await fake.wait_for(lambda: fake.interaction_responses[2:], timeout=10)
    assert shown.ephemeral and shown.content.splitlines()[1].endswith("alice /system: (default) → 'Be brief.'")
    # Both people talk in the channel; bob's export holds his messages and the replies to them only.
    await fake.send_user_message(general, admin, "alice's question")
    await fake.send_user_message(general, member, "bob's question")
    await fake.wait_for(lambda: len(app.queue.stats) or None, timeout=30)
    await app.queue.run_until_empty()
    await fake.invoke_command("export", user=member, channel_id=channel)
    [response] = await fake.wait_for(lambda: fake.interaction_responses[3:], timeout=10)
    assert response.ephemeral and response.message is not None
    [(filename, data)] = response.message.files.items()
    assert filename.endswith(".json")
    conversation = await app.repo.find_conversation(ConversationKey("discord", str(channel)))
    history = await app.repo.history(conversation.id)
    bobs = [m.text for m in history if m.author_id == str(member["id"])]
    assert bobs == ["bob's question"]
    [(text, reply)] = exported(data)
    assert text == "bob's question" and reply is not None and reply in [m.text for m in history if m.role == "assistant"]
    # A typed /export in the channel would show the file to everyone: it points to a private way.
    await fake.send_user_message(general, member, "/export")
    await fake.wait_for(
        lambda: any(m.content == messages.EXPORT_IN_PRIVATE for m in fake.messages_in(general)), timeout=10
    )

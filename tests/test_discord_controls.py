"""Reply controls on Discord (issue 14): buttons on a reply's last message, pressed through the
real discord.py client against the fake Discord (tests/fakes/discord_api.py), with Parley's real
router, queue and storage and a scripted backend (tests.support.ScriptedClient). Also Discord's
own details: /system visible to everyone, /help in slash syntax, a lone fence in a confirmation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.discord import DiscordAdapter
from adapters.discord_controls import UNKNOWN_BUTTON
from bot.conversation import messages
from bot.core.contracts import Control, RefusalKind, Refusal
from bot.core.types import ConversationKey, JobStatus
from bot.runtime.app import ParleyApp
from tests.fakes.discord_api import FakeDiscord, Permission
from tests.support import ScriptedClient, jobs_of, make_settings

TOKEN_ENV = "PARLEY_TEST_DISCORD_TOKEN"


@pytest.fixture
async def fake(monkeypatch):
    async with FakeDiscord(heartbeat_interval=0.5) as server:
        with server.patch_discord():
            monkeypatch.setenv(TOKEN_ENV, server.token)
            yield server


class World:
    def __init__(self, fake: FakeDiscord) -> None:
        self.admin, self.member, self.other = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
        self.guild = fake.add_guild("Parley Lab", owner=fake.owner_user)
        self.mods = fake.add_role(self.guild, "Mods", Permission.MANAGE_GUILD)
        fake.add_member(self.guild, self.admin, [self.mods])
        fake.add_member(self.guild, self.member)
        fake.add_member(self.guild, self.other)
        self.general = fake.add_text_channel(self.guild, "general")


@pytest.fixture
def world(fake):
    return World(fake)


def settings_for(tmp_path: Path, world: World, max_new_tokens: int = 40):  # noqa: ANN201
    discord = {
        "enabled": True,
        "token_env": TOKEN_ENV,
        "guild_ids": [int(world.guild["id"])],
        "edit_interval": 0.02,
        "ready_timeout": 10,
    }
    return make_settings(
        Path("unused"), tmp_path, discord=discord, console={"enabled": False}, generation={"max_new_tokens": max_new_tokens}
    )


async def start_app(settings, client: ScriptedClient) -> ParleyApp:  # noqa: ANN001
    app = ParleyApp(settings, [DiscordAdapter.from_config(settings, guild_ready_timeout=0.05)], client=client)
    await app.start()
    return app


@pytest.fixture
async def running(fake, world, tmp_path):
    """Start an app (`await running(client, max_new_tokens)`); every app started is stopped."""
    apps: list[ParleyApp] = []

    async def start(client: ScriptedClient, max_new_tokens: int = 40) -> ParleyApp:
        app = await start_app(settings_for(tmp_path, world, max_new_tokens), client)
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


def replies_in(fake: FakeDiscord, channel) -> list:  # noqa: ANN001
    return [m for m in fake.messages_in(channel) if m.kind == "channel"]


def labels(message) -> list[str]:  # noqa: ANN001
    return [button["label"] for button in message.buttons]


async def ask(fake: FakeDiscord, world: World, text: str = "tell me", *, user=None):  # noqa: ANN001, ANN201
    """`user` (bob by default) mentions the bot in #general; returns the reply message once it shows."""
    before = len(replies_in(fake, world.general))
    await fake.send_user_message(
        world.general, user or world.member, f"<@{fake.bot_id}> {text}", mentions=[fake.bot_user]
    )
    await fake.wait_for(lambda: len(replies_in(fake, world.general)) > before, timeout=20)
    return replies_in(fake, world.general)[-1]


async def answer_to(fake: FakeDiscord, interaction_id: int):  # noqa: ANN201
    return await fake.wait_for(
        lambda: next((r for r in fake.interaction_responses if r.interaction_id == interaction_id), None), timeout=10
    )


async def settled(app: ParleyApp) -> None:
    await asyncio.wait_for(app.queue.run_until_empty(), 20)


async def conversation_jobs(app: ParleyApp, world: World) -> list:
    conversation = await app.repo.find_conversation(ConversationKey("discord", str(world.general["id"])))
    return await jobs_of(app, conversation.id)


def refusal_sentence(kind: RefusalKind) -> str:
    return messages.render_refusal(Refusal(kind))


# -- the stream's buttons ---------------------------------------------------------------------------


async def test_buttons_only_on_the_last_message_of_a_long_reply(fake, world, running):
    app = await running(ScriptedClient())
    adapter = app.adapters["discord"]
    stream = await adapter.open_reply(ConversationKey("discord", str(world.general["id"])), None)
    stream.job_id = 7
    await stream.set_controls([Control.STOP])
    await stream.update("The first part. " * 10)
    [first] = replies_in(fake, world.general)
    assert labels(first) == ["Stop"] and first.buttons[0]["custom_id"] == "parley:stop:7"
    await stream.update("The first part. " * 200)  # past 2000 characters: a second message
    await stream.set_controls([Control.REGENERATE, Control.CONTINUE])
    await stream.finish("The first part. " * 200)
    shown = replies_in(fake, world.general)
    assert len(shown) == 2
    assert [labels(m) for m in shown] == [[], ["Regenerate", "Continue"]]
    assert [b["custom_id"] for b in shown[1].buttons] == ["parley:regen:7", "parley:cont:7"]
    failing = await adapter.open_reply(ConversationKey("discord", str(world.general["id"])), None)
    failing.job_id = 8
    await failing.set_controls([Control.STOP])
    await failing.update("half an answer")
    await failing.fail("Sorry.")
    assert labels(replies_in(fake, world.general)[-1]) == []  # a failed reply shows none


# -- pressing them -----------------------------------------------------------------------------------


async def test_stop_mid_stream_ends_the_reply_and_leaves_regenerate(fake, world, running):
    client = ScriptedClient(pause=0.01, hold_after=3)
    app = await running(client)
    reply = await ask(fake, world)
    await fake.wait_for(lambda: labels(reply) == ["Stop"] and "s1w3" in (reply.content or ""), timeout=10)
    pressed = await fake.press_button(reply, label="Stop", user=world.member)
    answer = await answer_to(fake, pressed)
    assert answer.type == 4 and answer.ephemeral and answer.content == messages.STOPPING
    await settled(app)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    assert reply.content.endswith(messages.STOPPED) and "s1w3" in reply.content and "s1w4" not in reply.content
    [job] = await conversation_jobs(app, world)
    assert job.status == JobStatus.CANCELLED.value
    assert len(replies_in(fake, world.general)) == 1


async def test_a_non_admin_cannot_stop_someone_elses_reply(fake, world, running):
    client = ScriptedClient(pause=0.005, hold_after=3, sample=lambda n: [f"w{i} " for i in range(1, 9)])
    app = await running(client)
    reply = await ask(fake, world)
    await fake.wait_for(lambda: labels(reply) == ["Stop"], timeout=10)
    pressed = await fake.press_button(reply, label="Stop", user=world.other)
    answer = await answer_to(fake, pressed)
    assert answer.ephemeral and answer.content == refusal_sentence(RefusalKind.NOT_YOURS)
    client.release.set()
    await settled(app)
    [job] = await conversation_jobs(app, world)
    assert job.status == JobStatus.DONE.value
    assert reply.content == "w1 w2 w3 w4 w5 w6 w7 w8" and labels(reply) == ["Regenerate"]


async def test_an_admin_may_stop_anyones_reply(fake, world, running):
    client = ScriptedClient(pause=0.005, hold_after=3)
    app = await running(client)
    reply = await ask(fake, world)
    await fake.wait_for(lambda: labels(reply) == ["Stop"], timeout=10)
    pressed = await fake.press_button(reply, label="Stop", user=world.admin)
    assert (await answer_to(fake, pressed)).content == messages.STOPPING
    await settled(app)
    [job] = await conversation_jobs(app, world)
    assert job.status == JobStatus.CANCELLED.value


async def test_regenerate_replaces_the_reply_in_place_and_a_double_press_runs_once(fake, world, running):
    client = ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"])
    app = await running(client)
    reply = await ask(fake, world)
    await settled(app)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    assert reply.content == "answer 1"
    first = await fake.press_button(reply, label="Regenerate", user=world.member)
    second = await fake.press_button(reply, label="Regenerate", user=world.member)  # a double tap
    await answer_to(fake, first)
    await answer_to(fake, second)
    # The same interaction delivered again (a replayed gateway event) changes nothing either.
    await fake.dispatch("INTERACTION_CREATE", fake.interaction_payload(first))
    await asyncio.sleep(0.2)
    await settled(app)
    await fake.wait_for(lambda: reply.content == "answer 2" and labels(reply) == ["Regenerate"], timeout=10)
    assert len(replies_in(fake, world.general)) == 1  # edited in place, nothing reposted
    assert len(await conversation_jobs(app, world)) == 2
    assert len(client.requests) == 2


async def test_continue_after_a_length_cut_appends_to_the_reply(fake, world, running):
    client = ScriptedClient(pause=0.001)
    app = await running(client, max_new_tokens=4)
    reply = await ask(fake, world)
    await settled(app)
    await fake.wait_for(lambda: "Continue" in labels(reply), timeout=10)
    cut = reply.content
    assert cut == "s1w1 s1w2 s1w3 s1w4"
    pressed = await fake.press_button(reply, label="Continue", user=world.member)
    await answer_to(fake, pressed)
    await settled(app)
    await fake.wait_for(lambda: reply.content != cut and reply.buttons, timeout=10)
    assert reply.content.startswith(cut) and "s1w8" in reply.content
    assert len(replies_in(fake, world.general)) == 1


async def test_presses_in_a_dm_and_in_a_thread(fake, world, running):
    app = await running(ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"]))
    dm = fake.dm_channel(world.other)
    await fake.dm(world.other, "hello")
    await fake.wait_for(lambda: replies_in(fake, dm), timeout=20)
    await settled(app)
    [reply] = replies_in(fake, dm)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    pressed = await fake.press_button(reply, label="Regenerate", user=world.other)
    assert (await answer_to(fake, pressed)).content == messages.REGENERATING
    await settled(app)
    await fake.wait_for(lambda: reply.content == "answer 2", timeout=10)
    thread = fake.add_thread(world.general, "side-chat", owner=world.member)
    await fake.send_user_message(thread, world.member, f"<@{fake.bot_id}> in a thread", mentions=[fake.bot_user])
    await fake.wait_for(lambda: replies_in(fake, thread), timeout=20)
    await settled(app)
    [reply] = replies_in(fake, thread)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    refused = await fake.press_button(reply, label="Regenerate", user=world.other)
    assert (await answer_to(fake, refused)).content == refusal_sentence(RefusalKind.NOT_YOURS)
    pressed = await fake.press_button(reply, label="Regenerate", user=world.member)
    assert (await answer_to(fake, pressed)).content == messages.REGENERATING
    await settled(app)
    await fake.wait_for(lambda: reply.content == "answer 4", timeout=10)


async def test_an_older_reply_loses_its_buttons_when_a_newer_one_arrives(fake, world, running):
    app = await running(ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"]))
    older = await ask(fake, world, "first")
    await settled(app)
    await fake.wait_for(lambda: labels(older) == ["Regenerate"], timeout=10)
    newer = await ask(fake, world, "second")
    await settled(app)
    await fake.wait_for(lambda: labels(newer) == ["Regenerate"] and labels(older) == [], timeout=10)
    # A stale client may still press the old button: the core says it no longer applies.
    pressed = await fake.press_button(older, "parley:regen:1", user=world.member)
    answer = await answer_to(fake, pressed)
    assert answer.ephemeral and answer.content == refusal_sentence(RefusalKind.CONTROL_EXPIRED)


async def test_a_press_after_a_restart_is_handled(fake, world, running):
    first = await running(ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"]))
    reply = await ask(fake, world)
    await settled(first)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    await first.stop()
    client = ScriptedClient(pause=0.001, sample=lambda n: [f"fresh answer {n}"])
    second = await running(client)  # a new client, the same fake and database
    pressed = await fake.press_button(reply, label="Regenerate", user=world.member)
    answer = await answer_to(fake, pressed)
    assert answer.content == messages.REGENERATING
    await settled(second)
    await fake.wait_for(lambda: reply.content == "fresh answer 1", timeout=10)
    assert labels(reply) == ["Regenerate"]


async def test_a_press_after_a_reset_says_so(fake, world, running):
    app = await running(ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"]))
    reply = await ask(fake, world)
    await settled(app)
    await fake.wait_for(lambda: labels(reply) == ["Regenerate"], timeout=10)
    await fake.invoke_command("reset", user=world.admin, channel_id=int(world.general["id"]))
    await fake.wait_for(lambda: fake.interaction_responses, timeout=10)
    pressed = await fake.press_button(reply, label="Regenerate", user=world.member)
    answer = await answer_to(fake, pressed)
    assert answer.ephemeral and answer.content == refusal_sentence(RefusalKind.CONVERSATION_RESET)


async def test_unknown_buttons_are_answered_without_a_crash(fake, world, running):
    app = await running(ScriptedClient(pause=0.001, sample=lambda n: [f"answer {n}"]))
    reply = await ask(fake, world)
    await settled(app)
    for custom_id in ("someone-else:button", "parley:stop:notanumber", "parley:explode:1"):
        pressed = await fake.press_button(reply, custom_id, user=world.member)
        answer = await answer_to(fake, pressed)
        assert answer.ephemeral and answer.content == UNKNOWN_BUTTON
    # Ours in form, but for a job that does not exist (nor is shown on the message).
    pressed = await fake.press_button(reply, "parley:regen:999999", user=world.member)
    answer = await answer_to(fake, pressed)
    assert answer.ephemeral and answer.content == refusal_sentence(RefusalKind.CONTROL_EXPIRED)
    # A press in a channel Parley has no conversation in.
    lobby = fake.add_text_channel(world.guild, "lobby")
    planted = await fake.send_user_message(lobby, world.member, "not a bot message")
    pressed = await fake.press_button(planted, "parley:stop:1", user=world.member)
    assert (await answer_to(fake, pressed)).ephemeral
    assert app.adapters["discord"].connected


# -- Discord's details ------------------------------------------------------------------------------


async def test_system_show_is_for_everyone_and_set_is_refused_to_members(fake, world, running):
    await running(ScriptedClient())
    general = int(world.general["id"])
    synced = {c["name"]: c for c in fake.synced_commands[int(world.guild["id"])]}
    assert synced["system"]["default_member_permissions"] is None
    assert synced["reset"]["default_member_permissions"] == str(int(Permission.MANAGE_GUILD))
    shown = await fake.invoke_command("system", [{"type": 1, "name": "show", "options": []}], user=world.member, channel_id=general)
    answer = await answer_to(fake, shown)
    assert answer.content.startswith("System prompt (default): You are a test bot.")
    refused = await fake.invoke_command(
        "system", [{"type": 1, "name": "set", "options": [{"type": 3, "name": "text", "value": "Be a pirate."}]}],
        user=world.member, channel_id=general,
    )
    answer = await answer_to(fake, refused)
    assert answer.ephemeral and answer.content == messages.render_refusal(Refusal(RefusalKind.NOT_ADMIN, command="system"))


async def test_help_shows_the_slash_syntax(fake, world, running):
    await running(ScriptedClient())
    asked = await fake.invoke_command("help", user=world.member, channel_id=int(world.general["id"]))
    text = (await answer_to(fake, asked)).content
    assert "/system set text:<text>" in text and "/system show" in text
    assert "/set [temperature:<number>] [top_p:<number>] [max_new_tokens:<integer>]" in text
    assert "/reset [system_prompt:<text>]" in text
    assert "key=value" not in text and "[text | clear | default]" not in text


async def test_a_lone_fence_in_a_system_prompt_leaves_the_confirmation_balanced(fake, world, running):
    await running(ScriptedClient())
    set_it = await fake.invoke_command(
        "system", [{"type": 1, "name": "set", "options": [{"type": 3, "name": "text", "value": "Answer in ``` blocks"}]}],
        user=world.admin, channel_id=int(world.general["id"]),
    )
    text = (await answer_to(fake, set_it)).content
    assert text.startswith("System prompt set: Answer in ``` blocks") and text.count("```") % 2 == 0
    assert messages.system_prompt_set("```").count("```") == 2
    assert messages.system_prompt_set("a ```b``` c") == "System prompt set: a ```b``` c"

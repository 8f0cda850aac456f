"""The real discord.py 2 client against the fake Discord in tests/fakes/discord_api.py.

These tests prove the fake is faithful enough for the Discord adapter's end-to-end tests: the real
``discord.Client`` / ``commands.Bot`` with a real ``app_commands.CommandTree`` logs in, connects to
the gateway (zlib-stream compressed), gets its guild cache from READY/GUILD_CREATE, receives
messages and interactions, and its REST calls (messages, edits, typing, command sync, interaction
responses and followups) are recorded, including rate limits, errors and gateway reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import io
import threading
import time
import warnings
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import pytest

discord = pytest.importorskip("discord")
from discord import app_commands  # noqa: E402
from discord.ext import commands  # noqa: E402

from tests.fakes.discord_api import (  # noqa: E402
    ALL_PERMISSIONS,
    FakeDiscord,
    Intent,
    Permission,
)

READY_TIMEOUT = 5.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(heartbeat_interval=0.2) as server:
        with server.patch_discord():
            yield server


@dataclasses.dataclass
class World:
    guild: dict[str, Any]
    general: dict[str, Any]
    thread: dict[str, Any]
    admin_role: dict[str, Any]
    mod_role: dict[str, Any]
    alice: dict[str, Any]  # administrator
    bob: dict[str, Any]  # plain member
    carol: dict[str, Any]  # Manage Server

    @property
    def guild_id(self) -> int:
        return int(self.guild["id"])

    @property
    def general_id(self) -> int:
        return int(self.general["id"])


def build_world(fake: FakeDiscord) -> World:
    alice, bob, carol = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("carol")
    guild = fake.add_guild("Parley Lab", owner=fake.owner_user)
    admin_role = fake.add_role(guild, "Admin", Permission.ADMINISTRATOR)
    mod_role = fake.add_role(guild, "Mods", Permission.MANAGE_GUILD)
    fake.add_member(guild, alice, [admin_role])
    fake.add_member(guild, bob)
    fake.add_member(guild, carol, [mod_role], nick="Caz")
    general = fake.add_text_channel(guild, "general", topic="chat")
    thread = fake.add_thread(general, "long-chat", owner=alice)
    return World(guild, general, thread, admin_role, mod_role, alice, bob, carol)


class RecordingClient(discord.Client):
    """A plain client with a CommandTree that records what it sees; ``respond`` is called for each
    message from someone else."""

    def __init__(self, *, message_content: bool = True, members: bool = False, **options: Any) -> None:
        intents = discord.Intents.default()
        intents.message_content = message_content
        intents.members = members
        super().__init__(intents=intents, guild_ready_timeout=0.05, **options)
        self.tree = app_commands.CommandTree(self)
        self.respond: Optional[Callable[[discord.Message], Awaitable[None]]] = None
        self.user_messages: list[discord.Message] = []
        self.own_messages: list[discord.Message] = []
        self.edits: list[tuple[discord.Message, discord.Message]] = []
        self.raw_deletes: list[discord.RawMessageDeleteEvent] = []
        self.ready_count = 0
        self.resumed_count = 0

    async def before_identify_hook(self, shard_id: Optional[int], *, initial: bool = False) -> None:
        # discord.py sleeps 5 s before every re-IDENTIFY (Discord's identify rate limit); a test
        # of session invalidation does not need to wait for it.
        return None

    async def on_ready(self) -> None:
        self.ready_count += 1

    async def on_resumed(self) -> None:
        self.resumed_count += 1

    async def on_message(self, message: discord.Message) -> None:
        if message.author.id == self.user.id:
            self.own_messages.append(message)
            return
        self.user_messages.append(message)
        if self.respond is not None:
            await self.respond(message)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        self.edits.append((before, after))

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        self.raw_deletes.append(payload)


@contextlib.asynccontextmanager
async def running(client: discord.Client, fake: FakeDiscord) -> AsyncIterator[discord.Client]:
    """``client.start()`` as a task until on_ready; ``client.close()`` and the task awaited after."""
    task = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_for(lambda: client.is_ready() or task.done(), timeout=READY_TIMEOUT, message="on_ready")
        if task.done():
            task.result()  # raises what start() raised
            raise AssertionError("client.start() returned before on_ready")
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(task, timeout=READY_TIMEOUT)


# ------------------------------------------------------------------------------ connecting


async def test_patch_points_discord_py_at_the_fake_and_restores() -> None:
    original = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    async with FakeDiscord() as server:
        with server.patch_discord():
            assert discord.http.Route.BASE == server.api_base == f"{server.url}/api/v10"
            assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == server.gateway_url
        assert (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == original


async def test_ready_populates_guild_cache(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient(members=True)
    async with running(client, fake):
        assert client.user.id == fake.bot_id and client.user.bot
        assert client.application_id == fake.application_id
        guild = client.get_guild(world.guild_id)
        assert guild is not None and guild.name == "Parley Lab"
        assert guild.owner_id == int(fake.owner_user["id"])
        general = guild.get_channel(world.general_id)
        assert isinstance(general, discord.TextChannel) and general.topic == "chat"
        thread = guild.get_thread(int(world.thread["id"]))
        assert isinstance(thread, discord.Thread) and thread.parent_id == world.general_id
        assert {r.name for r in guild.roles} == {"@everyone", "Admin", "Mods"}
        assert guild.get_member(int(world.alice["id"])).guild_permissions.administrator
        carol = guild.get_member(int(world.carol["id"]))
        assert carol.guild_permissions.manage_guild and not carol.guild_permissions.administrator
        assert carol.display_name == "Caz"
        assert not guild.get_member(int(world.bob["id"])).guild_permissions.manage_guild
        assert guild.me is not None and guild.chunked

        identify = fake.identify_payloads[0]
        assert identify["token"] == fake.token
        assert identify["intents"] & Intent.MESSAGE_CONTENT
        assert identify["intents"] == client.intents.value
        connection = fake.gateway_connections[0]
        assert connection.path == "/gateway"
        assert connection.query["v"] == "10" and connection.query["encoding"] == "json"
        assert connection.compress == discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE

        await fake.wait_for(lambda: fake.heartbeats >= 2, message="two heartbeats")
        assert client.latency < 1.0

    paths = [r.path for r in fake.requests]
    assert paths[:2] == ["/users/@me", "/oauth2/applications/@me"]


async def test_commands_bot_prefix_command_and_global_sync(fake: FakeDiscord) -> None:
    world = build_world(fake)
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.Bot(command_prefix="!", intents=intents, guild_ready_timeout=0.05)

    @bot.command()
    async def ping(ctx: commands.Context) -> None:
        await ctx.reply("pong", mention_author=False)

    @bot.tree.command(name="hello", description="Say hello")
    async def hello(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("hi there")

    async with running(bot, fake):
        synced = await bot.tree.sync()
        assert [c.name for c in synced] == ["hello"]
        assert [c["name"] for c in fake.synced_commands[None]] == ["hello"]

        await fake.send_user_message(world.general, world.alice, "!ping")
        pong = (await fake.wait_for(lambda: fake.messages))[0]
        assert pong.content == "pong"
        assert pong.allowed_mentions is not None and pong.allowed_mentions.get("replied_user") is False
        assert pong.pinged_user_ids == ()

        iid = await fake.invoke_command("hello", user=world.alice, channel_id=world.general)
        response = (await fake.wait_for(lambda: fake.interaction_responses))[0]
        assert response.interaction_id == iid
        assert (response.type, response.content, response.ephemeral) == (4, "hi there", False)


# ------------------------------------------------------------------------------ messages


async def test_message_reaches_on_message_and_reply_is_recorded(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()

    async def reply(message: discord.Message) -> None:
        await message.reply(f"echo: {message.content}", allowed_mentions=discord.AllowedMentions.none())

    client.respond = reply
    async with running(client, fake):
        content = f"{fake.mention(fake.bot_user)} hello"
        sent = await fake.send_user_message(world.general, world.alice, content, mentions=[fake.bot_user])

        record = (await fake.wait_for(lambda: fake.messages))[0]
        assert record.content == f"echo: {content}"
        assert record.channel_id == world.general_id and record.guild_id == world.guild_id
        assert record.allowed_mentions == {"parse": []}
        assert int(record.message_reference["message_id"]) == int(sent["id"])
        assert record.pinged_user_ids == ()  # the mention inside the echo is suppressed

        received = client.user_messages[0]
        assert received.content == content
        assert received.id == int(sent["id"])
        assert client.user in received.mentions
        assert isinstance(received.author, discord.Member)
        assert received.author.get_role(int(world.admin_role["id"])) is not None
        assert received.guild.id == world.guild_id

        # Discord echoes the bot's own message back over the gateway.
        own = (await fake.wait_for(lambda: client.own_messages))[0]
        assert own.id == record.id and own.reference.message_id == int(sent["id"])

        # Without allowed_mentions a reply pings the replied-to author, as on Discord.
        channel = client.get_channel(world.general_id)
        pinging = await channel.send("ping", reference=received)
        assert fake.messages[-1].pinged_user_ids == (int(world.alice["id"]),)
        assert pinging.mentions and pinging.mentions[0].id == int(world.alice["id"])


async def test_thread_reply_attachment_and_dm(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        first = await fake.send_user_message(world.thread, world.bob, "question?")
        second = await fake.send_user_message(
            world.thread, world.alice, "answer with file", reply_to=first,
            attachments=[{"filename": "notes.txt", "data": b"hello file", "content_type": "text/plain"}],
        )
        await fake.wait_for(lambda: len(client.user_messages) == 2)
        message = client.user_messages[1]
        assert message.id == int(second["id"])
        assert isinstance(message.channel, discord.Thread) and message.channel.id == int(world.thread["id"])
        assert message.reference is not None and message.reference.message_id == int(first["id"])
        assert message.reference.resolved.content == "question?"
        assert message.attachments[0].filename == "notes.txt"
        assert await message.attachments[0].read() == b"hello file"

        await fake.dm(world.bob, "psst")
        dm = (await fake.wait_for(lambda: client.user_messages[2:]))[0]
        assert dm.guild is None and isinstance(dm.channel, discord.DMChannel)
        assert dm.content == "psst" and dm.author.id == int(world.bob["id"])
        await dm.channel.send("dm reply")
        dm_channel = fake.dm_channel(world.bob)
        assert [m.content for m in fake.messages_in(dm_channel)] == ["dm reply"]

        # A DM channel opened from the bot's side goes through POST /users/@me/channels.
        user = await client.fetch_user(int(world.carol["id"]))
        await user.send("hello carol")
        assert fake.messages[-1].channel_id == int(fake.dm_channel(world.carol)["id"])


async def test_edit_delete_and_typing(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        channel = client.get_channel(world.general_id)
        async with channel.typing():
            message = await channel.send("draft")
        await message.edit(content="draft 2")
        await message.edit(content="final")

        record = fake.messages[0]
        assert record.content == "final"
        assert record.revisions == ["draft", "draft 2", "final"]
        assert [(e.message_id, e.content) for e in fake.edits] == [(message.id, "draft 2"), (message.id, "final")]
        assert fake.typing and fake.typing[0].channel_id == world.general_id
        assert fake.typing[0].time <= record.created_at
        assert fake.get_message(message.id)["edited_timestamp"] is not None

        fetched = await channel.fetch_message(message.id)
        assert fetched.content == "final" and fetched.edited_at is not None

        with_file = await channel.send("see file", file=discord.File(io.BytesIO(b"file body"), "notes.txt"))
        uploaded = fake.messages[-1]
        assert uploaded.id == with_file.id and uploaded.files == {"notes.txt": b"file body"}
        assert [a["filename"] for a in uploaded.attachments] == ["notes.txt"]
        assert await with_file.attachments[0].read() == b"file body"
        assert [m.content async for m in channel.history(limit=10)] == ["see file", "final"]

        await message.delete()
        assert record.deleted and fake.get_message(message.id) is None

        # A user's edit and delete reach the client.
        sent = await fake.send_user_message(world.general, world.bob, "tpyo")
        await fake.wait_for(lambda: client.user_messages)
        await fake.edit_user_message(sent, "typo")
        before, after = (await fake.wait_for(lambda: [e for e in client.edits if e[1].id == int(sent["id"])]))[0]
        assert (before.content, after.content) == ("tpyo", "typo")
        await fake.delete_user_message(sent)
        deleted = (await fake.wait_for(lambda: [d for d in client.raw_deletes if d.message_id == int(sent["id"])]))
        assert deleted[0].channel_id == world.general_id


async def test_discord_validation_errors(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        channel = client.get_channel(world.general_id)
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        assert (too_long.value.status, too_long.value.code) == (400, 50035)
        assert "2000 or fewer" in str(too_long.value)
        await channel.send("x" * 2000)

        with pytest.raises(discord.HTTPException) as empty:
            await channel.send("")
        assert (empty.value.status, empty.value.code) == (400, 50006)
        assert [m.content for m in fake.messages] == ["x" * 2000]

        with pytest.raises(discord.NotFound):
            await client.http.send_message(123, params=discord.http.handle_message_parameters(content="hi"))


async def test_message_content_intent_missing_blanks_guild_content(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient(message_content=False)
    async with running(client, fake):
        await fake.send_user_message(world.general, world.bob, "secret")
        await fake.send_user_message(world.general, world.bob, f"{fake.mention(fake.bot_user)} visible",
                                     mentions=[fake.bot_user])
        await fake.dm(world.bob, "dm visible")
        await fake.wait_for(lambda: len(client.user_messages) == 3)
        assert [m.content for m in client.user_messages] == ["", f"<@{fake.bot_id}> visible", "dm visible"]


# ------------------------------------------------------------------------------ app commands


async def test_guild_command_sync_and_ephemeral_response(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    guild = discord.Object(world.guild_id)
    seen: list[discord.Interaction] = []

    @client.tree.command(name="ask", description="Ask Parley", guild=guild)
    @app_commands.describe(prompt="What to ask")
    async def ask(interaction: discord.Interaction, prompt: str, creative: bool = False) -> None:
        seen.append(interaction)
        await interaction.response.send_message(f"you asked: {prompt} ({creative})", ephemeral=True)

    @client.tree.command(name="settings", description="Change settings", guild=guild)
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.checks.has_permissions(manage_guild=True)
    async def settings(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("settings changed", ephemeral=True)

    @settings.error
    async def settings_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await interaction.response.send_message("you need Manage Server", ephemeral=True)

    async with running(client, fake):
        synced = await client.tree.sync(guild=guild)
        stored = {c["name"]: c for c in fake.synced_commands[world.guild_id]}
        assert {c.name for c in synced} == set(stored) == {"ask", "settings"}
        assert {c.id for c in synced} == {int(c["id"]) for c in stored.values()}
        assert stored["settings"]["default_member_permissions"] == str(int(Permission.MANAGE_GUILD))
        assert [o["name"] for o in stored["ask"]["options"]] == ["prompt", "creative"]
        assert None not in fake.synced_commands

        iid = await fake.invoke_command("ask", {"prompt": "why?", "creative": True}, user=world.bob,
                                        channel_id=world.general)
        response = (await fake.wait_for(lambda: fake.interaction_responses))[0]
        assert response.interaction_id == iid
        assert (response.type, response.flags, response.content) == (4, 64, "you asked: why? (True)")
        assert response.ephemeral and response.message is not None and response.message.ephemeral

        interaction = seen[0]
        assert interaction.id == iid
        assert interaction.guild_id == world.guild_id and interaction.channel.id == world.general_id
        assert isinstance(interaction.user, discord.Member) and interaction.user.id == int(world.bob["id"])
        assert not interaction.permissions.manage_guild
        assert interaction.app_permissions.send_messages

        async def settings_reply(user: dict[str, Any]) -> str:
            count = len(fake.interaction_responses)
            await fake.invoke_command("settings", user=user, channel_id=world.general)
            responses = await fake.wait_for(lambda: fake.interaction_responses[count:])
            return responses[0].content

        assert await settings_reply(world.bob) == "you need Manage Server"
        assert await settings_reply(world.carol) == "settings changed"
        assert await settings_reply(world.alice) == "settings changed"
        payload = fake.interaction_payload(iid)
        assert payload["member"]["permissions"] == str(fake.compute_permissions(world.guild, world.bob,
                                                                                world.general))
        alice_id = next(r.interaction_id for r in fake.interaction_responses[-1:])
        assert fake.interaction_payload(alice_id)["member"]["permissions"] == str(ALL_PERMISSIONS)


async def test_deferred_response_then_followups(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    results: dict[str, Any] = {}

    @client.tree.command(name="slow", description="Think first")
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        first = await interaction.followup.send("first", wait=True)
        second = await interaction.followup.send("second", ephemeral=True, wait=True)
        await interaction.edit_original_response(content="first (edited)")
        original = await interaction.original_response()
        results.update(first=first, second=second, original=original)

    async with running(client, fake):
        await client.tree.sync()
        iid = await fake.invoke_command("slow", user=world.alice, channel_id=world.thread)
        await fake.wait_for(lambda: "original" in results)

        response = fake.interaction_responses[0]
        assert (response.interaction_id, response.type, response.ephemeral) == (iid, 5, False)
        original = response.message
        assert original is not None and not original.loading
        # The first followup after a deferral fills the "thinking" message, as Discord does.
        assert fake.followups[0] is original
        assert original.revisions == [None, "first", "first (edited)"]
        assert results["first"].id == original.id == results["original"].id
        assert results["original"].content == "first (edited)"
        second = fake.followups[1]
        assert (second.content, second.ephemeral, second.kind) == ("second", True, "followup")
        assert results["second"].id == second.id
        assert [e.content for e in fake.edits] == ["first", "first (edited)"]
        assert fake.messages == []  # nothing went through the channel endpoints


async def test_dm_slash_command(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    seen: list[discord.Interaction] = []

    @client.tree.command(name="whoami", description="Who am I")
    async def whoami(interaction: discord.Interaction) -> None:
        seen.append(interaction)
        await interaction.response.send_message(f"you are {interaction.user.name}")

    async with running(client, fake):
        await client.tree.sync()
        await fake.invoke_command("whoami", user=world.bob, channel_id=fake.dm_channel(world.bob))
        response = (await fake.wait_for(lambda: fake.interaction_responses))[0]
        assert response.content == "you are bob"
        interaction = seen[0]
        assert interaction.guild is None and not isinstance(interaction.user, discord.Member)
        assert isinstance(interaction.channel, discord.DMChannel)


# ------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("global_", [False, True])
async def test_rate_limit_is_waited_out_by_discord_py(fake: FakeDiscord, global_: bool) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        channel = client.get_channel(world.general_id)
        failure = fake.fail_next("POST", "/channels/*/messages", status=429, retry_after=0.3, global_=global_)
        started = time.monotonic()
        message = await channel.send("after the limit")
        elapsed = time.monotonic() - started

        assert failure.hits == 1 and failure.exhausted
        assert elapsed >= 0.3
        assert fake.messages[-1].content == "after the limit" and fake.messages[-1].id == message.id
        posts = [r for r in fake.requests if r.method == "POST" and r.path.endswith("/messages")]
        assert [r.status for r in posts] == [429, 200]


async def test_forbidden_and_server_error(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        channel = client.get_channel(world.general_id)
        fake.fail_next("POST", "/channels/*/messages", status=403)
        with pytest.raises(discord.Forbidden) as forbidden:
            await channel.send("nope")
        assert (forbidden.value.status, forbidden.value.code) == (403, 50013)
        assert forbidden.value.text == "Missing Permissions"

        fake.fail_next("POST", "/channels/*/messages", status=500)
        await channel.send("retried")  # discord.py retries a 500 after one second
        posts = [r.status for r in fake.requests if r.method == "POST" and r.path.endswith("/messages")]
        assert posts == [403, 500, 200]
        assert [m.content for m in fake.messages] == ["retried"]


async def test_wrong_token_is_login_failure(fake: FakeDiscord) -> None:
    client = RecordingClient()
    with pytest.raises(discord.LoginFailure):
        await client.start("not-the-token")
    await client.close()
    assert (fake.requests[-1].path, fake.requests[-1].status) == ("/users/@me", 401)
    assert fake.gateway_connections == []


async def test_revoked_token_closes_gateway_with_4004(fake: FakeDiscord) -> None:
    client = RecordingClient()
    await client.login(fake.token)
    fake.token = "revoked"
    with pytest.raises(discord.ConnectionClosed) as closed:
        await client.connect(reconnect=False)
    assert closed.value.code == 4004
    await client.close()
    assert fake.gateway_connections[0].close_code == 4004


async def test_disallowed_privileged_intent() -> None:
    async with FakeDiscord(allowed_privileged_intents=0) as strict, strict.patch_discord():
        client = RecordingClient()
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await client.start(strict.token)
        await client.close()
        assert strict.gateway_connections[0].close_code == 4014


# ------------------------------------------------------------------------------ gateway resilience


async def test_forced_reconnect_resumes_without_losing_events(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        session_id = fake.session_ids[0]

        # Server closes the socket; a message is dispatched while the client is away.
        await fake.disconnect_gateway(code=4000)
        await fake.send_user_message(world.general, world.alice, "while you were away")
        await fake.wait_for(lambda: client.resumed_count == 1, message="RESUMED")
        await fake.wait_for(lambda: client.user_messages)

        # Op 7 RECONNECT from the server.
        await fake.request_reconnect()
        await fake.send_user_message(world.general, world.alice, "after op 7")
        await fake.wait_for(lambda: client.resumed_count == 2, message="second RESUMED")
        await fake.wait_for(lambda: len(client.user_messages) == 2)

        assert [m.content for m in client.user_messages] == ["while you were away", "after op 7"]
        assert len(fake.identify_payloads) == 1 and client.ready_count == 1
        assert [p["session_id"] for p in fake.resume_payloads] == [session_id, session_id]
        assert [c.path for c in fake.gateway_connections] == ["/gateway", "/gateway/resume", "/gateway/resume"]
        assert fake.gateway_connections[0].close_code == 4000

        # An invalidated session makes the client IDENTIFY again and fire on_ready anew.
        await fake.disconnect_gateway(code=4000, invalidate_session=True)
        await fake.wait_for(lambda: client.ready_count == 2, message="second on_ready")
        assert len(fake.identify_payloads) == 2 and fake.session_ids != [session_id]
        await fake.send_user_message(world.general, world.bob, "new session")
        await fake.wait_for(lambda: len(client.user_messages) == 3)
        assert client.user_messages[-1].content == "new session"
        assert client.get_guild(world.guild_id) is not None


async def test_clean_shutdown_leaves_nothing_open(fake: FakeDiscord) -> None:
    build_world(fake)
    client = RecordingClient()
    async with running(client, fake):
        assert fake.open_gateway_connections == 1
    assert client.is_closed()
    await fake.wait_for(lambda: fake.open_gateway_connections == 0)
    last = fake.gateway_connections[-1]
    # discord.py asks for 1000, but its reader task wins the aiohttp close handshake and 4000 goes
    # out on the wire, so Discord (and the fake) keep the session resumable.
    assert last.closed_by == "client" and last.close_code in (1000, 4000)
    assert (fake.session_ids == []) == (last.close_code == 1000)
    await fake.wait_for(lambda: not any(isinstance(t, discord.gateway.KeepAliveHandler)
                                        for t in threading.enumerate()), message="heartbeat thread stopped")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del client
        gc.collect()
    assert [w for w in caught if issubclass(w.category, (ResourceWarning, RuntimeWarning))] == []


async def test_messages_sent_while_offline_are_only_in_the_history(fake: FakeDiscord) -> None:
    from datetime import timedelta

    world = build_world(fake)
    earlier = await fake.send_user_message(world.general, world.bob, "long ago", age=3_600, deliver=False)
    missed = await fake.send_user_message(world.general, world.bob, "while you were out", deliver=False)
    client = RecordingClient()
    async with running(client, fake):
        await fake.send_user_message(world.general, world.bob, "live")
        await fake.wait_for(lambda: client.user_messages, message="the live message")
        assert [m.content for m in client.user_messages] == ["live"]  # the others were not delivered
        channel = client.get_channel(world.general_id)
        history = [m async for m in channel.history(limit=10)]
        assert [m.content for m in history] == ["live", "while you were out", "long ago"]
        old = history[-1]
        assert str(old.id) == earlier["id"] and str(history[1].id) == missed["id"]
        age = (discord.utils.utcnow() - old.created_at).total_seconds()
        assert 3_590 < age < 3_700  # the id and the timestamp both say an hour ago
        ten_minutes_ago = discord.utils.utcnow() - timedelta(minutes=10)
        recent = [m.content async for m in channel.history(after=ten_minutes_ago)]
        assert recent == ["while you were out", "live"]  # oldest first, as discord.py gives them


# ------------------------------------------------------------------------------ buttons


async def test_buttons_pressed_answered_and_removed(fake: FakeDiscord) -> None:
    world = build_world(fake)
    client = RecordingClient()
    pressed: list[tuple[str, int, bool]] = []

    class Buttons(discord.ui.View):
        def __init__(self) -> None:
            super().__init__(timeout=None)

        @discord.ui.button(label="Update", custom_id="t:update")
        async def update(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            pressed.append(("update", interaction.user.id, interaction.permissions.manage_guild))
            await interaction.response.edit_message(content="updated", view=None)  # type 7

        @discord.ui.button(label="Quiet", custom_id="t:quiet")
        async def quiet(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            pressed.append(("quiet", interaction.user.id, interaction.permissions.manage_guild))
            await interaction.response.defer()  # type 6

        @discord.ui.button(label="Say", custom_id="t:say")
        async def say(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.send_message("only you", ephemeral=True)  # type 4, flags 64

    async with running(client, fake):
        client.add_view(Buttons())  # persistent: found by custom_id, whatever the message
        channel = client.get_channel(world.general_id)
        message = await channel.send("choose", view=Buttons())
        [record] = fake.messages
        assert [b["custom_id"] for b in record.buttons] == ["t:update", "t:quiet", "t:say"]
        assert fake.get_message(message.id)["components"][0]["type"] == 1

        quiet = await fake.press_button(record, label="Quiet", user=world.carol)
        said = await fake.press_button(record, "t:say", user=world.bob)
        responses = await fake.wait_for(lambda: fake.interaction_responses if len(fake.interaction_responses) == 2 else None)
        by_id = {r.interaction_id: r for r in responses}
        assert by_id[quiet].type == 6 and by_id[quiet].message is None
        assert by_id[said].type == 4 and by_id[said].ephemeral and by_id[said].content == "only you"
        payload = fake.interaction_payload(quiet)
        assert payload["type"] == 3 and payload["data"] == {"custom_id": "t:quiet", "component_type": 2}
        assert payload["message"]["id"] == str(message.id)

        update = await fake.press_button(record, label="Update", user=world.bob)
        await fake.wait_for(lambda: record.content == "updated")
        assert record.buttons == [] and fake.get_message(message.id)["components"] == []
        assert next(r for r in fake.interaction_responses if r.interaction_id == update).type == 7
        assert pressed == [("quiet", int(world.carol["id"]), True), ("update", int(world.bob["id"]), False)]
        with pytest.raises(Exception, match="no button labelled"):
            await fake.press_button(record, label="Update", user=world.bob)

        # Buttons come and go with edits; Discord's limits on them are enforced.
        await message.edit(view=Buttons())
        assert len(record.buttons) == 3
        await message.edit(content="plain", view=None)
        assert record.buttons == [] and record.content == "plain"
        send = discord.http.Route("POST", "/channels/{channel_id}/messages", channel_id=world.general_id)
        twice = {"type": 2, "style": 1, "label": "a", "custom_id": "same"}
        for components in ([{"type": 1, "components": [twice, twice]}], [twice], [{"type": 1, "components": [{"type": 2, "style": 1, "label": "no id"}]}]):
            with pytest.raises(discord.HTTPException) as refused:
                await client.http.request(send, json={"content": "x", "components": components})
            assert (refused.value.status, refused.value.code) == (400, 50035)
        # Callback types 6 and 7 are for component interactions only.
        command = await fake.invoke_command("nothing", user=world.bob, channel_id=world.general_id)
        token = fake.interaction_payload(command)["token"]
        with pytest.raises(discord.HTTPException):
            await client.http.request(
                discord.http.Route("POST", "/interactions/{id}/{token}/callback", id=command, token=token), json={"type": 6}
            )

"""A fake Discord — gateway websocket and REST API — served on 127.0.0.1 for the real discord.py.

Only the far end is fake: tests run the real ``discord.Client`` / ``commands.Bot`` with a real
``app_commands.CommandTree`` and point it here with :meth:`FakeDiscord.patch_discord`, which swaps
the two URLs discord.py reads (``discord.http.Route.BASE``, also used by interaction webhooks, and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``; a plain ``Client`` never asks
``GET /gateway/bot``). Nothing here imports discord.py at module level, so the module imports where
discord.py is not installed.

Typical use::

    async with FakeDiscord() as fake, fake.patch_discord():
        guild = fake.add_guild("Test")
        general = fake.add_text_channel(guild, "general")
        alice = fake.add_user("alice")
        fake.add_member(guild, alice)
        task = asyncio.create_task(client.start(fake.token))
        await client.wait_until_ready()
        await fake.send_user_message(general, alice, "hello")
        await fake.wait_for(lambda: fake.messages)
        await client.close()
        await task

Payloads follow the Discord API v10 shapes (string snowflakes); builder methods return those dicts
and accept a dict, an int or a str wherever they need an id. Recordings are plain lists and
dataclasses; times are ``time.monotonic()`` values.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import enum
import fnmatch
import hashlib
import json
import math
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Sequence, Union

from aiohttp import WSMsgType, web

__all__ = [
    "API_VERSION",
    "ALL_PERMISSIONS",
    "BotMessage",
    "DEFAULT_EVERYONE_PERMISSIONS",
    "Edit",
    "FakeDiscord",
    "FakeDiscordError",
    "GatewayConnectionInfo",
    "InjectedFailure",
    "Intent",
    "InteractionResponse",
    "Permission",
    "PRIVILEGED_INTENTS",
    "RecordedRequest",
    "TypingEvent",
]

API_VERSION = 10
DISCORD_EPOCH_MS = 1420070400000
MAX_MESSAGE_LENGTH = 2000

Snowflakeish = Union[int, str, Mapping[str, Any]]


class Permission(enum.IntFlag):
    """Discord permission bits used by tests (the full set is in ``ALL_PERMISSIONS``)."""

    CREATE_INSTANT_INVITE = 1 << 0
    KICK_MEMBERS = 1 << 1
    BAN_MEMBERS = 1 << 2
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_APPLICATION_COMMANDS = 1 << 31
    CREATE_PUBLIC_THREADS = 1 << 35
    SEND_MESSAGES_IN_THREADS = 1 << 38


ALL_PERMISSIONS = (1 << 51) - 1
DEFAULT_EVERYONE_PERMISSIONS = int(
    Permission.VIEW_CHANNEL
    | Permission.SEND_MESSAGES
    | Permission.READ_MESSAGE_HISTORY
    | Permission.ADD_REACTIONS
    | Permission.EMBED_LINKS
    | Permission.ATTACH_FILES
    | Permission.USE_APPLICATION_COMMANDS
    | Permission.CREATE_PUBLIC_THREADS
    | Permission.SEND_MESSAGES_IN_THREADS
    | Permission.CREATE_INSTANT_INVITE
)


class Intent(enum.IntFlag):
    """Gateway intent bits the fake looks at."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    DIRECT_MESSAGES = 1 << 12
    MESSAGE_CONTENT = 1 << 15


PRIVILEGED_INTENTS = int(Intent.GUILD_MEMBERS | Intent.GUILD_PRESENCES | Intent.MESSAGE_CONTENT)

# Channel types (Discord's numbers).
_DM, _GUILD_TEXT, _PUBLIC_THREAD, _PRIVATE_THREAD = 1, 0, 11, 12
_THREAD_TYPES = (10, _PUBLIC_THREAD, _PRIVATE_THREAD)

# Message flags.
_EPHEMERAL, _LOADING = 1 << 6, 1 << 7

# Gateway opcodes.
_OP_DISPATCH, _OP_HEARTBEAT, _OP_IDENTIFY, _OP_PRESENCE, _OP_VOICE = 0, 1, 2, 3, 4
_OP_RESUME, _OP_RECONNECT, _OP_REQUEST_MEMBERS, _OP_INVALID_SESSION = 6, 7, 8, 9
_OP_HELLO, _OP_HEARTBEAT_ACK = 10, 11

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_EVERYONE_MENTION = re.compile(r"@(everyone|here)\b")
_COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")


class FakeDiscordError(Exception):
    """The test script misused the fake (unknown id, no gateway session, ...)."""


@dataclass
class RecordedRequest:
    """One REST call the client made: path is relative to ``/api/v10``; json is the parsed body
    (``payload_json`` for multipart); status is what the fake answered."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    time: float
    status: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class BotMessage:
    """A message the bot created: in a channel (``kind="channel"``), as an interaction's original
    response (``"interaction_response"``) or as a followup (``"followup"``). ``content`` is the
    current text, ``revisions`` every version in order (the first is as created; ``None`` for a
    deferred "thinking" message), ``payload`` the last request body."""

    id: int
    kind: str
    channel_id: Optional[int]
    guild_id: Optional[int]
    content: Optional[str]
    revisions: list[Optional[str]]
    allowed_mentions: Optional[dict[str, Any]]
    message_reference: Optional[dict[str, Any]]
    flags: int
    embeds: list[dict[str, Any]]
    attachments: list[dict[str, Any]]
    pinged_user_ids: tuple[int, ...]
    payload: dict[str, Any]
    created_at: float
    interaction_id: Optional[int] = None
    deleted: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    components: list[dict[str, Any]] = field(default_factory=list)
    """The message's component rows as last sent (``[]`` once removed)."""

    @property
    def buttons(self) -> list[dict[str, Any]]:
        """The buttons (component type 2) the message shows now, in order."""
        return [c for row in self.components for c in row.get("components", ()) if c.get("type") == 2]

    @property
    def ephemeral(self) -> bool:
        """Whether the message has the EPHEMERAL flag (64)."""
        return bool(self.flags & _EPHEMERAL)

    @property
    def loading(self) -> bool:
        """Whether this is still a deferred "thinking" placeholder (flag 128)."""
        return bool(self.flags & _LOADING)


@dataclass
class Edit:
    """One accepted edit of a bot message (channel message, original response or followup)."""

    message_id: int
    kind: str
    channel_id: Optional[int]
    content: Optional[str]
    payload: dict[str, Any]
    time: float


@dataclass
class TypingEvent:
    """One ``POST /channels/{id}/typing``."""

    channel_id: int
    time: float


@dataclass
class InteractionResponse:
    """One interaction callback (``POST /interactions/{id}/{token}/callback``). ``message`` is the
    original response message for types 4 and 5, shared with later edits and followups."""

    interaction_id: int
    type: int
    flags: int
    content: Optional[str]
    data: Optional[dict[str, Any]]
    time: float
    message: Optional[BotMessage] = None

    @property
    def ephemeral(self) -> bool:
        """Whether the response was sent with the EPHEMERAL flag (64)."""
        return bool(self.flags & _EPHEMERAL)


@dataclass
class GatewayConnectionInfo:
    """One websocket connection: the URL path and query discord.py used and how it ended."""

    path: str
    query: dict[str, str]
    compress: Optional[str]
    time: float
    close_code: Optional[int] = None
    closed_by: Optional[str] = None


@dataclass
class InjectedFailure:
    """A pending failure from :meth:`FakeDiscord.fail_next`; ``hits`` counts answered requests."""

    method: str
    path_pattern: Union[str, "re.Pattern[str]"]
    status: int
    times: int
    retry_after: float
    global_: bool
    code: int
    message: str
    body: Optional[dict[str, Any]]
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method != "*" and self.method.upper() != method.upper():
            return False
        if isinstance(self.path_pattern, re.Pattern):
            return self.path_pattern.search(path) is not None
        return fnmatch.fnmatchcase(path, self.path_pattern)

    @property
    def exhausted(self) -> bool:
        return self.hits >= self.times


# --------------------------------------------------------------------------------------------
# internals


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def _id_of(value: Snowflakeish) -> int:
    if isinstance(value, Mapping):
        if "id" not in value and "user" in value:  # a member object
            value = value["user"]
        return int(value["id"])
    return int(value)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


class _Compressor:
    """Transport compression for one gateway connection: one stream per connection, every
    payload flushed so the client can decode it on its own (zlib ends with 00 00 ff ff)."""

    def __init__(self, kind: Optional[str]) -> None:
        self.kind = kind
        self._flush: Callable[[bytes], bytes]
        if kind is None:
            return
        if kind == "zlib-stream":
            stream = zlib.compressobj()
            self._flush = lambda data: stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
        elif kind == "zstd-stream":
            self._flush = self._zstd_stream()
        else:
            raise ValueError(kind)

    @staticmethod
    def _zstd_stream() -> Callable[[bytes], bytes]:
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

            compressor = zstd.ZstdCompressor()
            return lambda data: compressor.compress(data, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
        except ImportError:
            import zstandard  # type: ignore[import-not-found]  # discord.py prefers it when present

            stream = zstandard.ZstdCompressor().compressobj()
            return lambda data: stream.compress(data) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def encode(self, text: str) -> Union[str, bytes]:
        if self.kind is None:
            return text
        return self._flush(text.encode("utf-8"))


class _GatewayConnection:
    def __init__(self, ws: web.WebSocketResponse, compressor: _Compressor, info: GatewayConnectionInfo) -> None:
        self.ws = ws
        self.compressor = compressor
        self.info = info
        self.session: Optional[_GatewaySession] = None
        self.closed_by_server = False
        self._send_lock = asyncio.Lock()

    async def send(self, payload: dict[str, Any]) -> bool:
        # The compression stream is stateful: compress and send under one lock, in order.
        async with self._send_lock:
            if self.ws.closed:
                return False
            data = self.compressor.encode(_dumps(payload))
            try:
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(data)
            except (ConnectionError, RuntimeError):
                return False
            return True

    async def close(self, code: int, reason: str = "") -> None:
        if self.ws.closed:
            return
        self.closed_by_server = True
        self.info.closed_by = "server"
        self.info.close_code = code
        await self.ws.close(code=code, message=reason.encode())


@dataclass
class _GatewaySession:
    session_id: str
    intents: int
    shard: list[int]
    seq: int = 0
    backlog: list[dict[str, Any]] = field(default_factory=list)
    conn: Optional[_GatewayConnection] = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Guild:
    data: dict[str, Any]
    roles: dict[int, dict[str, Any]] = field(default_factory=dict)
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    channel_ids: list[int] = field(default_factory=list)
    thread_ids: list[int] = field(default_factory=list)

    @property
    def id(self) -> int:
        return int(self.data["id"])


@dataclass
class _Interaction:
    id: int
    token: str
    channel_id: int
    guild_id: Optional[int]
    user_id: int
    payload: dict[str, Any]
    response: Optional[InteractionResponse] = None
    original: Optional[BotMessage] = None
    deferred_placeholder_pending: bool = False
    message_id: Optional[int] = None
    """A component interaction (type 3): the message whose component was used."""


@dataclass
class _Call:
    request: web.Request
    method: str
    path: str
    params: dict[str, str]
    json: Any
    files: list[tuple[str, str, Optional[str], bytes]]

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query


_Handler = Callable[[_Call], Awaitable[web.StreamResponse]]


class _DiscordPatch:
    """Points discord.py at the fake while active; usable with ``with`` and ``async with``."""

    def __init__(self, fake: "FakeDiscord") -> None:
        self._fake = fake
        self._saved: Optional[tuple[Any, Any]] = None

    def __enter__(self) -> "FakeDiscord":
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        if not self._fake.port:
            raise FakeDiscordError("start the fake before patching discord.py")
        self._saved = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
        Route.BASE = self._fake.api_base
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self._fake.gateway_url)
        return self._fake

    def __exit__(self, *exc: Any) -> None:
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        assert self._saved is not None
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = self._saved
        self._saved = None

    async def __aenter__(self) -> "FakeDiscord":
        return self.__enter__()

    async def __aexit__(self, *exc: Any) -> None:
        self.__exit__(*exc)


# --------------------------------------------------------------------------------------------


class FakeDiscord:
    """A fake Discord on 127.0.0.1: gateway websocket at ``/gateway``, REST at ``/api/v10``.

    Parameters
    ----------
    token:
        The bot token the fake accepts (generated when omitted; read ``fake.token``). Assign a new
        value to ``fake.token`` to simulate a revoked token: REST then answers 401 and IDENTIFY is
        closed with 4004.
    bot_name:
        Username of the bot user.
    heartbeat_interval:
        Seconds, sent in HELLO (Discord sends about 41.25).
    allowed_privileged_intents:
        Privileged intents "enabled in the developer portal"; IDENTIFY asking for others is closed
        with 4014 (discord.py raises ``PrivilegedIntentsRequired``).
    echo_bot_messages:
        Dispatch MESSAGE_CREATE/UPDATE/DELETE for the bot's own channel messages, as Discord does
        (interaction responses and followups are not echoed).
    enforce_intents:
        Drop message events the session's intents do not cover and blank the content of guild
        messages that do not mention the bot when MESSAGE_CONTENT is missing, as Discord does.
    """

    def __init__(
        self,
        *,
        token: Optional[str] = None,
        bot_name: str = "Parley",
        heartbeat_interval: float = 1.0,
        allowed_privileged_intents: int = PRIVILEGED_INTENTS,
        echo_bot_messages: bool = True,
        enforce_intents: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port: int = 0
        self.heartbeat_interval = heartbeat_interval
        self.allowed_privileged_intents = int(allowed_privileged_intents)
        self.echo_bot_messages = echo_bot_messages
        self.enforce_intents = enforce_intents

        self._last_snowflake = 0
        self._users: dict[int, dict[str, Any]] = {}
        self._guilds: dict[int, _Guild] = {}
        self._channels: dict[int, dict[str, Any]] = {}
        self._dm_channels: dict[int, int] = {}
        self._all_messages: dict[int, dict[str, Any]] = {}
        self._bot_messages: dict[int, BotMessage] = {}
        self._attachments: dict[int, bytes] = {}
        self._interactions: dict[int, _Interaction] = {}
        self._interactions_by_token: dict[str, _Interaction] = {}
        self._command_ids: dict[tuple[Optional[int], int, str], int] = {}
        self._sessions: dict[str, _GatewaySession] = {}
        self._connections: set[_GatewayConnection] = set()
        self._failures: list[InjectedFailure] = []
        self._runner: Optional[web.AppRunner] = None
        self._route_table = self._routes()

        self.bot_user: dict[str, Any] = self.add_user(bot_name, bot=True)
        self.bot_user.update(verified=True, mfa_enabled=False, flags=0, email=None)
        self.bot_id: int = int(self.bot_user["id"])
        self.application_id: int = self.bot_id  # Discord bots share their application's id
        self.owner_user: dict[str, Any] = self.add_user("app-owner")
        self.token: str = token or self._make_token(self.bot_id)

        # Recordings.
        self.requests: list[RecordedRequest] = []
        self.messages: list[BotMessage] = []
        self.edits: list[Edit] = []
        self.typing: list[TypingEvent] = []
        self.interaction_responses: list[InteractionResponse] = []
        self.followups: list[BotMessage] = []
        self.synced_commands: dict[Optional[int], list[dict[str, Any]]] = {}
        self.identify_payloads: list[dict[str, Any]] = []
        self.resume_payloads: list[dict[str, Any]] = []
        self.presence_updates: list[dict[str, Any]] = []
        self.gateway_connections: list[GatewayConnectionInfo] = []
        self.heartbeats: int = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Serve on a free port of ``host``; ``url``, ``api_base`` and ``gateway_url`` are set after."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/gateway", self._gateway_handler)
        app.router.add_get("/gateway/resume", self._gateway_handler)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._attachment_handler)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest_handler)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner

    async def stop(self) -> None:
        """Close every gateway connection (code 1001) and stop serving."""
        if self._runner is None:
            return
        for conn in list(self._connections):
            if not conn.ws.closed:
                await conn.close(1001, "Fake Discord stopping")
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> "FakeDiscord":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """What ``discord.http.Route.BASE`` is set to: ``http://127.0.0.1:PORT/api/v10``."""
        return f"{self.url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        """Gateway URL (answered by ``GET /gateway/bot``): ``ws://127.0.0.1:PORT/gateway``."""
        return f"ws://{self.host}:{self.port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        """The ``resume_gateway_url`` sent in READY (a different path, so tests can see it used)."""
        return f"ws://{self.host}:{self.port}/gateway/resume"

    def patch_discord(self) -> _DiscordPatch:
        """Context manager (``with`` or ``async with``) pointing discord.py at this fake: sets
        ``discord.http.Route.BASE`` (REST and interaction webhooks) to :attr:`api_base` and
        ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` to :attr:`gateway_url`, restoring
        both on exit. Process-wide: one patched fake at a time."""
        return _DiscordPatch(self)

    # ---------------------------------------------------------------- builders

    def _snowflake(self) -> int:
        value = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        value = max(value, self._last_snowflake + 1)
        self._last_snowflake = value
        return value

    def _past_snowflake(self, age: float) -> int:
        """A fresh id whose embedded time is ``age`` seconds ago (for messages "sent" back then)."""
        value = (int((time.time() - age) * 1000) - DISCORD_EPOCH_MS) << 22
        while value in self._all_messages:
            value += 1
        return value

    @staticmethod
    def _make_token(bot_id: int) -> str:
        head = base64.urlsafe_b64encode(str(bot_id).encode()).decode().rstrip("=")
        return f"{head}.{secrets.token_urlsafe(4)}.{secrets.token_urlsafe(28)}"

    def add_user(self, username: str, *, bot: bool = False, global_name: Optional[str] = None,
                 user_id: Optional[int] = None) -> dict[str, Any]:
        """Create a user and return its Discord user object."""
        uid = user_id or self._snowflake()
        user: dict[str, Any] = {
            "id": str(uid),
            "username": username,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "public_flags": 0,
        }
        if bot:
            user["bot"] = True
        self._users[uid] = user
        return user

    def add_guild(self, name: str = "Test Guild", *, owner: Optional[Snowflakeish] = None,
                  guild_id: Optional[int] = None,
                  everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS) -> dict[str, Any]:
        """Create a guild with its @everyone role; the bot and the owner (a new user when omitted)
        become members. Sent in GUILD_CREATE to every later IDENTIFY."""
        gid = guild_id or self._snowflake()
        owner_user = self._user(owner) if owner is not None else self.add_user(f"{name}-owner")
        data = {
            "id": str(gid),
            "name": name,
            "icon": None,
            "owner_id": owner_user["id"],
            "description": None,
            "features": [],
            "preferred_locale": "en-US",
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "afk_timeout": 300,
            "system_channel_id": None,
            "system_channel_flags": 0,
        }
        guild = _Guild(data=data)
        self._guilds[gid] = guild
        guild.roles[gid] = self._role_payload(gid, "@everyone", everyone_permissions, position=0)
        self.add_member(gid, owner_user)
        self.add_member(gid, self.bot_user)
        return data

    @staticmethod
    def _role_payload(rid: int, name: str, permissions: int, *, position: int) -> dict[str, Any]:
        return {
            "id": str(rid),
            "name": name,
            "permissions": str(int(permissions)),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def add_role(self, guild: Snowflakeish, name: str, permissions: int = 0, *,
                 position: Optional[int] = None) -> dict[str, Any]:
        """Create a role with the given permission bits (e.g. ``Permission.MANAGE_GUILD``)."""
        g = self._guild(guild)
        rid = self._snowflake()
        role = self._role_payload(rid, name, permissions, position=position if position is not None else len(g.roles))
        g.roles[rid] = role
        return role

    def add_member(self, guild: Snowflakeish, user: Snowflakeish, roles: Iterable[Snowflakeish] = (), *,
                   nick: Optional[str] = None) -> dict[str, Any]:
        """Make ``user`` a member of ``guild`` with ``roles`` (replacing an existing membership)."""
        g = self._guild(guild)
        u = self._user(user)
        role_ids = [str(_id_of(r)) for r in roles]
        for rid in role_ids:
            if int(rid) not in g.roles:
                raise FakeDiscordError(f"role {rid} is not in guild {g.id}")
        member = {
            "user": u,
            "roles": role_ids,
            "nick": nick,
            "avatar": None,
            "joined_at": _now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        g.members[int(u["id"])] = member
        return member

    def add_text_channel(self, guild: Snowflakeish, name: str, *, topic: Optional[str] = None,
                         parent_id: Optional[Snowflakeish] = None,
                         permission_overwrites: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        """Create a text channel. ``permission_overwrites`` items: ``{"id", "type": 0 role | 1 member,
        "allow", "deny"}`` (ints or strings)."""
        g = self._guild(guild)
        cid = self._snowflake()
        channel = {
            "id": str(cid),
            "type": _GUILD_TEXT,
            "guild_id": str(g.id),
            "name": name,
            "position": len(g.channel_ids),
            "topic": topic,
            "nsfw": False,
            "parent_id": str(_id_of(parent_id)) if parent_id is not None else None,
            "rate_limit_per_user": 0,
            "last_message_id": None,
            "flags": 0,
            "permission_overwrites": [
                {"id": str(_id_of(o["id"])), "type": int(o.get("type", 0)),
                 "allow": str(int(o.get("allow", 0))), "deny": str(int(o.get("deny", 0)))}
                for o in permission_overwrites
            ],
        }
        self._channels[cid] = channel
        g.channel_ids.append(cid)
        return channel

    def add_thread(self, parent: Snowflakeish, name: str, *, owner: Optional[Snowflakeish] = None,
                   private: bool = False) -> dict[str, Any]:
        """Create an active thread under a text channel (owned by the bot when ``owner`` is omitted)."""
        parent_channel = self._channel(parent)
        if parent_channel["type"] != _GUILD_TEXT:
            raise FakeDiscordError("threads need a guild text channel as parent")
        g = self._guild(parent_channel["guild_id"])
        tid = self._snowflake()
        now = _now_iso()
        thread = {
            "id": str(tid),
            "type": _PRIVATE_THREAD if private else _PUBLIC_THREAD,
            "guild_id": str(g.id),
            "parent_id": parent_channel["id"],
            "owner_id": str(_id_of(owner)) if owner is not None else str(self.bot_id),
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "total_message_sent": 0,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
            },
        }
        self._channels[tid] = thread
        g.thread_ids.append(tid)
        return thread

    def dm_channel(self, user: Snowflakeish) -> dict[str, Any]:
        """The DM channel between the bot and ``user`` (created on first use)."""
        u = self._user(user)
        uid = int(u["id"])
        if uid not in self._dm_channels:
            cid = self._snowflake()
            self._channels[cid] = {"id": str(cid), "type": _DM, "recipients": [u], "last_message_id": None, "flags": 0}
            self._dm_channels[uid] = cid
        return self._channels[self._dm_channels[uid]]

    @staticmethod
    def mention(user: Snowflakeish) -> str:
        """``<@id>`` for a user, to put in message content."""
        return f"<@{_id_of(user)}>"

    def compute_permissions(self, guild: Snowflakeish, user: Snowflakeish,
                            channel: Optional[Snowflakeish] = None) -> int:
        """Discord's permission algorithm: owner and ADMINISTRATOR get everything; otherwise
        @everyone | roles, then the channel's (or a thread's parent's) overwrites."""
        g = self._guild(guild)
        uid = _id_of(user)
        if str(uid) == g.data["owner_id"]:
            return ALL_PERMISSIONS
        member = g.members.get(uid)
        if member is None:
            return 0
        role_ids = {int(r) for r in member["roles"]}
        perms = int(g.roles[g.id]["permissions"])
        for rid in role_ids:
            perms |= int(g.roles[rid]["permissions"])
        if perms & Permission.ADMINISTRATOR:
            return ALL_PERMISSIONS
        if channel is None:
            return perms
        ch = self._channel(channel)
        if ch["type"] in _THREAD_TYPES:
            ch = self._channel(ch["parent_id"])
        overwrites = {int(o["id"]): o for o in ch.get("permission_overwrites", [])}
        everyone = overwrites.get(g.id)
        if everyone:
            perms = (perms & ~int(everyone["deny"])) | int(everyone["allow"])
        allow = deny = 0
        for rid in role_ids:
            o = overwrites.get(rid)
            if o and o["type"] == 0:
                allow |= int(o["allow"])
                deny |= int(o["deny"])
        perms = (perms & ~deny) | allow
        own = overwrites.get(uid)
        if own and own["type"] == 1:
            perms = (perms & ~int(own["deny"])) | int(own["allow"])
        return perms

    # ---------------------------------------------------------------- lookups

    def _user(self, ref: Snowflakeish) -> dict[str, Any]:
        uid = _id_of(ref)
        try:
            return self._users[uid]
        except KeyError:
            raise FakeDiscordError(f"unknown user {uid}") from None

    def _guild(self, ref: Snowflakeish) -> _Guild:
        gid = _id_of(ref)
        try:
            return self._guilds[gid]
        except KeyError:
            raise FakeDiscordError(f"unknown guild {gid}") from None

    def _channel(self, ref: Snowflakeish) -> dict[str, Any]:
        cid = _id_of(ref)
        try:
            return self._channels[cid]
        except KeyError:
            raise FakeDiscordError(f"unknown channel {cid}") from None

    def _channel_guild_id(self, channel: Mapping[str, Any]) -> Optional[int]:
        gid = channel.get("guild_id")
        return int(gid) if gid is not None else None

    def _partial_member(self, guild_id: int, user_id: int) -> Optional[dict[str, Any]]:
        member = self._guilds[guild_id].members.get(user_id)
        if member is None:
            return None
        return {k: v for k, v in member.items() if k != "user"}

    def get_message(self, message_id: Snowflakeish) -> Optional[dict[str, Any]]:
        """The current payload of any live message (user's or bot's), or ``None``."""
        return self._all_messages.get(_id_of(message_id))

    def messages_in(self, channel: Snowflakeish) -> list[BotMessage]:
        """The bot's live channel messages in one channel, oldest first."""
        cid = _id_of(channel)
        return [m for m in self.messages if m.channel_id == cid and not m.deleted]

    # ---------------------------------------------------------------- message payloads

    def _resolve_mentions(self, content: Optional[str], allowed: Optional[Mapping[str, Any]],
                          replied_author: Optional[int], guild_id: Optional[int]
                          ) -> tuple[list[int], list[int], bool]:
        text = content or ""
        users_in = [int(m) for m in _USER_MENTION.findall(text)]
        users_in = [u for u in dict.fromkeys(users_in) if u in self._users]
        roles_in = [int(m) for m in _ROLE_MENTION.findall(text)]
        roles_in = list(dict.fromkeys(r for r in roles_in if guild_id and r in self._guilds[guild_id].roles))
        if allowed is None:
            parse = {"users", "roles", "everyone"}
            allowed_users: set[int] = set()
            allowed_roles: set[int] = set()
            replied = True
        else:
            parse = set(allowed.get("parse") or ())
            allowed_users = {int(u) for u in allowed.get("users") or ()}
            allowed_roles = {int(r) for r in allowed.get("roles") or ()}
            replied = bool(allowed.get("replied_user", False))
        user_ids = [u for u in users_in if "users" in parse or u in allowed_users]
        if replied and replied_author is not None and replied_author not in user_ids:
            user_ids.append(replied_author)
        role_ids = [r for r in roles_in if "roles" in parse or r in allowed_roles]
        everyone = bool(_EVERYONE_MENTION.search(text)) and "everyone" in parse
        return user_ids, role_ids, everyone

    def _mention_objects(self, user_ids: Iterable[int], guild_id: Optional[int]) -> list[dict[str, Any]]:
        result = []
        for uid in user_ids:
            user = dict(self._users[uid])
            if guild_id is not None:
                member = self._partial_member(guild_id, uid)
                if member is not None:
                    user["member"] = member
            result.append(user)
        return result

    def _attachment_payload(self, channel_id: int, filename: str, data: bytes,
                            content_type: Optional[str], description: Optional[str] = None) -> dict[str, Any]:
        aid = self._snowflake()
        self._attachments[aid] = data
        url = f"{self.url}/attachments/{channel_id}/{aid}/{filename}"
        payload: dict[str, Any] = {"id": str(aid), "filename": filename, "size": len(data), "url": url,
                                   "proxy_url": url, "content_type": content_type}
        if description is not None:
            payload["description"] = description
        return payload

    def _message_payload(self, *, message_id: int, channel: Mapping[str, Any], author: Mapping[str, Any],
                         content: str, mentions: Sequence[int] = (), mention_roles: Sequence[int] = (),
                         mention_everyone: bool = False, reference: Optional[Mapping[str, Any]] = None,
                         attachments: Sequence[Mapping[str, Any]] = (), embeds: Sequence[Any] = (),
                         flags: int = 0, timestamp: Optional[str] = None,
                         components: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
        guild_id = self._channel_guild_id(channel)
        msg: dict[str, Any] = {
            "id": str(message_id),
            "type": 19 if reference else 0,
            "channel_id": channel["id"],
            "author": dict(author),
            "content": content,
            "timestamp": timestamp or _now_iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": mention_everyone,
            "mentions": self._mention_objects(mentions, guild_id),
            "mention_roles": [str(r) for r in mention_roles],
            "attachments": [dict(a) for a in attachments],
            "embeds": list(embeds),
            "pinned": False,
            "flags": flags,
            "components": copy.deepcopy(list(components)),
        }
        if guild_id is not None:
            msg["guild_id"] = str(guild_id)
            member = self._partial_member(guild_id, int(author["id"]))
            if member is not None:
                msg["member"] = member
        if reference:
            ref_id = int(reference["message_id"])
            ref_msg = self._all_messages.get(ref_id)
            msg["message_reference"] = {
                "type": 0,
                "message_id": str(ref_id),
                "channel_id": str(reference.get("channel_id") or channel["id"]),
                **({"guild_id": str(guild_id)} if guild_id is not None else {}),
            }
            if ref_msg is not None:
                msg["referenced_message"] = {k: v for k, v in ref_msg.items() if k != "referenced_message"}
            else:
                msg["referenced_message"] = None
        return msg

    # ---------------------------------------------------------------- scripting: events

    def _live_sessions(self) -> list[_GatewaySession]:
        return list(self._sessions.values())

    def _require_session(self) -> None:
        if not self._sessions:
            raise FakeDiscordError(
                "no identified gateway session; start the client and await client.wait_until_ready() "
                "(or fake.wait_until_identified()) first"
            )

    async def _dispatch_locked(self, session: _GatewaySession, event: str, data: Any) -> None:
        session.seq += 1
        payload = {"op": _OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.backlog.append(payload)
        if session.conn is not None:
            await session.conn.send(payload)

    async def _dispatch_to(self, session: _GatewaySession, event: str, data: Any) -> None:
        async with session.lock:
            await self._dispatch_locked(session, event, data)

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a raw DISPATCH (``t=event``, ``d=data``) to every gateway session. Events sent while
        a session is disconnected are kept and replayed on RESUME, as Discord does."""
        self._require_session()
        for session in self._live_sessions():
            await self._dispatch_to(session, event, copy.deepcopy(data))

    def _content_visible(self, message: Mapping[str, Any]) -> bool:
        if "guild_id" not in message:
            return True
        if message.get("author", {}).get("id") == str(self.bot_id):
            return True
        return any(m.get("id") == str(self.bot_id) for m in message.get("mentions", ()))

    async def _dispatch_message_event(self, event: str, message: Mapping[str, Any]) -> None:
        in_guild = "guild_id" in message
        needed = Intent.GUILD_MESSAGES if in_guild else Intent.DIRECT_MESSAGES
        for session in self._live_sessions():
            data = copy.deepcopy(dict(message))
            if self.enforce_intents:
                if not session.intents & needed:
                    continue
                if (event != "MESSAGE_DELETE" and not session.intents & Intent.MESSAGE_CONTENT
                        and not self._content_visible(message)):
                    data.update(content="", embeds=[], attachments=[], components=[])
                    data.pop("poll", None)
            await self._dispatch_to(session, event, data)

    async def send_user_message(self, channel: Snowflakeish, author: Snowflakeish, content: str, *,
                                mentions: Iterable[Snowflakeish] = (), mention_roles: Iterable[Snowflakeish] = (),
                                reply_to: Optional[Snowflakeish] = None,
                                attachments: Iterable[Mapping[str, Any]] = (),
                                embeds: Sequence[Mapping[str, Any]] = (),
                                age: float = 0.0, deliver: bool = True) -> dict[str, Any]:
        """A user posts ``content`` in a guild channel, thread or DM channel: MESSAGE_CREATE is
        dispatched and the message payload returned. ``mentions`` are users (put ``fake.mention(u)``
        in the content too); ``reply_to`` a message (adds ``message_reference`` and
        ``referenced_message``); ``attachments`` items ``{"filename", "data": bytes,
        "content_type"}`` are served by the fake so ``Attachment.read()`` works.

        ``age``: the message was sent that many seconds ago (its id and timestamp say so).
        ``deliver=False``: the message is only stored, readable through the channel's history (GET
        ``/channels/{id}/messages``) and not dispatched, as for a bot that is offline or whose
        session could not resume; no gateway session is needed then."""
        if deliver:
            self._require_session()
        ch = self._channel(channel)
        user = self._user(author)
        guild_id = self._channel_guild_id(ch)
        if guild_id is not None and int(user["id"]) not in self._guilds[guild_id].members:
            raise FakeDiscordError(f"user {user['id']} is not a member of guild {guild_id}; add_member first")
        reference = None
        if reply_to is not None:
            ref_id = _id_of(reply_to)
            if ref_id not in self._all_messages:
                raise FakeDiscordError(f"unknown message {ref_id} to reply to")
            reference = {"message_id": ref_id, "channel_id": self._all_messages[ref_id]["channel_id"]}
        atts = [
            self._attachment_payload(int(ch["id"]), a.get("filename", "file.bin"), bytes(a.get("data", b"")),
                                     a.get("content_type"), a.get("description"))
            for a in attachments
        ]
        mention_ids = [_id_of(m) for m in mentions]
        for uid in mention_ids:
            self._user(uid)
        message_id = self._past_snowflake(age) if age > 0 else self._snowflake()
        sent = datetime.now(timezone.utc) - timedelta(seconds=age)
        msg = self._message_payload(
            message_id=message_id, channel=ch, author=user, content=content, mentions=mention_ids,
            mention_roles=[_id_of(r) for r in mention_roles],
            mention_everyone=bool(_EVERYONE_MENTION.search(content)), reference=reference,
            attachments=atts, embeds=embeds, timestamp=sent.isoformat(),
        )
        self._all_messages[int(msg["id"])] = msg
        if age <= 0:
            ch["last_message_id"] = msg["id"]
        if deliver:
            await self._dispatch_message_event("MESSAGE_CREATE", msg)
        return msg

    async def dm(self, user: Snowflakeish, content: str, **kwargs: Any) -> dict[str, Any]:
        """``user`` sends the bot a direct message (same keywords as :meth:`send_user_message`)."""
        channel = self.dm_channel(user)
        return await self.send_user_message(channel, user, content, **kwargs)

    async def edit_user_message(self, message: Snowflakeish, content: str) -> dict[str, Any]:
        """A user edits their message: MESSAGE_UPDATE with the full new payload, which is returned."""
        self._require_session()
        mid = _id_of(message)
        msg = self._all_messages.get(mid)
        if msg is None:
            raise FakeDiscordError(f"unknown message {mid}")
        msg["content"] = content
        msg["edited_timestamp"] = _now_iso()
        await self._dispatch_message_event("MESSAGE_UPDATE", msg)
        return msg

    async def delete_user_message(self, message: Snowflakeish) -> None:
        """A user deletes a message: MESSAGE_DELETE is dispatched."""
        self._require_session()
        mid = _id_of(message)
        msg = self._all_messages.pop(mid, None)
        if msg is None:
            raise FakeDiscordError(f"unknown message {mid}")
        await self._dispatch_message_event("MESSAGE_DELETE", self._delete_payload(msg))

    @staticmethod
    def _delete_payload(msg: Mapping[str, Any]) -> dict[str, Any]:
        data = {"id": msg["id"], "channel_id": msg["channel_id"]}
        if "guild_id" in msg:
            data["guild_id"] = msg["guild_id"]
        return data

    def _synced_command(self, name: str, guild_id: Optional[int]) -> tuple[Optional[dict[str, Any]], bool]:
        if guild_id is not None:
            for cmd in self.synced_commands.get(guild_id, ()):
                if cmd["name"] == name and cmd.get("type", 1) == 1:
                    return cmd, True
        for cmd in self.synced_commands.get(None, ()):
            if cmd["name"] == name and cmd.get("type", 1) == 1:
                return cmd, False
        return None, False

    def _command_options(self, command: Optional[Mapping[str, Any]], options: Any, guild_id: Optional[int],
                         channel_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if options is None:
            return [], {}
        if isinstance(options, (list, tuple)):
            return [dict(o) for o in options], {}
        declared = {o["name"]: o for o in (command or {}).get("options", [])}
        result: list[dict[str, Any]] = []
        resolved: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if name in declared:
                kind = int(declared[name]["type"])
            elif isinstance(value, bool):
                kind = 5
            elif isinstance(value, int):
                kind = 4
            elif isinstance(value, float):
                kind = 10
            else:
                kind = 3
            if kind == 6:  # USER
                user = self._user(value)
                value = user["id"]
                resolved.setdefault("users", {})[value] = user
                if guild_id is not None:
                    member = self._partial_member(guild_id, int(value))
                    if member is not None:
                        member["permissions"] = str(self.compute_permissions(guild_id, value, channel_id))
                        resolved.setdefault("members", {})[value] = member
            elif kind == 7:  # CHANNEL
                ch = self._channel(value)
                value = ch["id"]
                entry = {k: ch[k] for k in ("id", "type", "name", "parent_id", "thread_metadata") if k in ch}
                entry["permissions"] = str(ALL_PERMISSIONS)
                resolved.setdefault("channels", {})[value] = entry
            elif kind == 8:  # ROLE
                rid = _id_of(value)
                if guild_id is None or rid not in self._guilds[guild_id].roles:
                    raise FakeDiscordError(f"unknown role {rid}")
                value = str(rid)
                resolved.setdefault("roles", {})[value] = self._guilds[guild_id].roles[rid]
            result.append({"name": name, "type": kind, "value": value})
        return result, resolved

    async def invoke_command(self, name: str,
                             options: Union[Mapping[str, Any], Sequence[Mapping[str, Any]], None] = None,
                             *, user: Snowflakeish, channel_id: Snowflakeish,
                             guild_id: Optional[Snowflakeish] = None, locale: str = "en-US") -> int:
        """``user`` (a user or member object, or an id) runs the slash command ``name`` in
        ``channel_id`` (a guild channel, thread or the user's DM channel; ``guild_id`` defaults to
        the channel's guild): INTERACTION_CREATE (type 2) is dispatched and its id returned.

        ``options`` is ``{name: value}`` (option types taken from the synced command, else guessed
        from the Python type; USER/CHANNEL/ROLE values may be ids or payloads and are added to
        ``resolved``) or a raw list of option objects (subcommands). In guilds the interaction
        carries ``member`` with its computed ``permissions`` string and ``app_permissions``; in DMs
        ``user``. ``data.guild_id`` is set when the command was synced to that guild, as Discord
        does; unsynced commands are sent as global ones."""
        self._require_session()
        ch = self._channel(channel_id)
        invoker = self._user(user)
        uid = int(invoker["id"])
        guild_id = _id_of(guild_id) if guild_id is not None else self._channel_guild_id(ch)
        command, guild_scoped = self._synced_command(name, guild_id)
        option_list, resolved = self._command_options(command, options, guild_id, int(ch["id"]))
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._snowflake()),
            "name": name,
            "type": 1,
            "options": option_list,
        }
        if guild_scoped:
            data["guild_id"] = str(guild_id)
        if resolved:
            data["resolved"] = resolved
        return await self._dispatch_interaction(2, data, ch, invoker, guild_id, locale)

    async def press_button(self, message: Union[Snowflakeish, BotMessage], custom_id: Optional[str] = None, *, user: Snowflakeish,
                           label: Optional[str] = None, locale: str = "en-US") -> int:
        """``user`` presses a button of ``message`` (a bot message, its payload or id), chosen by
        ``custom_id`` or ``label``: INTERACTION_CREATE (type 3, MESSAGE_COMPONENT, component_type
        2) is dispatched with the message as it is now, and its id returned. A custom_id the
        message does not show may be pressed too (a stale client); a label must be shown. In guilds
        the interaction carries ``member`` with its computed ``permissions``, as for commands."""
        self._require_session()
        mid = message.id if isinstance(message, BotMessage) else _id_of(message)
        msg = self._all_messages.get(mid)
        if msg is None:
            raise FakeDiscordError(f"unknown message {mid}")
        if custom_id is None:
            shown = [c for row in msg.get("components", ()) for c in row.get("components", ())
                     if c.get("type") == 2 and c.get("label") == label]
            if not shown:
                raise FakeDiscordError(f"message {mid} shows no button labelled {label!r}")
            custom_id = shown[0]["custom_id"]
        ch = self._channel(msg["channel_id"])
        invoker = self._user(user)
        data = {"custom_id": custom_id, "component_type": 2}
        return await self._dispatch_interaction(3, data, ch, invoker, self._channel_guild_id(ch), locale,
                                                message=copy.deepcopy(msg))

    async def _dispatch_interaction(self, kind: int, data: dict[str, Any], ch: dict[str, Any],
                                    invoker: dict[str, Any], guild_id: Optional[int], locale: str, *,
                                    message: Optional[dict[str, Any]] = None) -> int:
        uid = int(invoker["id"])
        iid = self._snowflake()
        token = "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48)
        channel_payload = {k: v for k, v in ch.items() if k != "recipients"}
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": ch["id"],
            "channel": channel_payload,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if message is not None:
            payload["message"] = message
        if guild_id is not None:
            g = self._guild(guild_id)
            if uid not in g.members:
                raise FakeDiscordError(f"user {uid} is not a member of guild {guild_id}; add_member first")
            member = copy.deepcopy(g.members[uid])
            member["permissions"] = str(self.compute_permissions(guild_id, uid, ch["id"]))
            channel_payload["permissions"] = member["permissions"]
            payload.update(
                guild_id=str(guild_id),
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=member,
                app_permissions=str(self.compute_permissions(guild_id, self.bot_id, ch["id"])),
                context=0,
                authorizing_integration_owners={"0": str(guild_id)},
            )
        else:
            channel_payload["recipients"] = [invoker]
            payload.update(
                user=invoker,
                app_permissions=str(int(Permission.SEND_MESSAGES | Permission.VIEW_CHANNEL
                                        | Permission.EMBED_LINKS | Permission.ATTACH_FILES
                                        | Permission.READ_MESSAGE_HISTORY)),
                context=1,
                authorizing_integration_owners={"0": "0"},
            )
        record = _Interaction(id=iid, token=token, channel_id=int(ch["id"]), guild_id=guild_id, user_id=uid,
                              payload=payload, message_id=int(message["id"]) if message is not None else None)
        self._interactions[iid] = record
        self._interactions_by_token[token] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        return iid

    def interaction_payload(self, interaction_id: Snowflakeish) -> dict[str, Any]:
        """The INTERACTION_CREATE payload sent for ``interaction_id``."""
        return self._interactions[_id_of(interaction_id)].payload

    # ---------------------------------------------------------------- scripting: gateway control

    async def wait_until_identified(self, timeout: float = 5.0) -> None:
        """Wait until some session has been sent READY and its GUILD_CREATEs."""
        await self.wait_for(lambda: any(s.ready.is_set() for s in self._sessions.values()), timeout=timeout,
                            message="no gateway IDENTIFY")

    async def disconnect_gateway(self, code: int = 4000, reason: str = "", *, invalidate_session: bool = False) -> None:
        """Close every open gateway connection with ``code``. Sessions stay resumable (discord.py
        reconnects to ``resume_gateway_url`` and RESUMEs; events dispatched meanwhile are replayed)
        unless ``invalidate_session`` — then the RESUME gets INVALID_SESSION and the client
        IDENTIFYs again, losing the events in between, as with Discord."""
        for session in self._live_sessions():
            async with session.lock:
                conn, session.conn = session.conn, None
            if invalidate_session:
                self._sessions.pop(session.session_id, None)
            if conn is not None and not conn.ws.closed:
                await conn.close(code, reason)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT on every open connection; discord.py closes and RESUMEs."""
        for session in self._live_sessions():
            async with session.lock:
                if session.conn is not None:
                    await session.conn.send({"op": _OP_RECONNECT, "d": None, "s": None, "t": None})

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION; unless ``resumable`` the session is dropped first."""
        for session in self._live_sessions():
            async with session.lock:
                conn = session.conn
                if not resumable:
                    self._sessions.pop(session.session_id, None)
                if conn is not None:
                    await conn.send({"op": _OP_INVALID_SESSION, "d": resumable, "s": None, "t": None})

    @property
    def open_gateway_connections(self) -> int:
        """How many gateway websockets are open now."""
        return len(self._connections)

    @property
    def session_ids(self) -> list[str]:
        """Ids of the live (resumable) gateway sessions."""
        return list(self._sessions)

    # ---------------------------------------------------------------- failure injection

    def fail_next(self, method: str, path_pattern: Union[str, "re.Pattern[str]"], *, status: int = 429,
                  retry_after: float = 0.1, global_: bool = False, times: int = 1, code: Optional[int] = None,
                  message: Optional[str] = None, body: Optional[dict[str, Any]] = None) -> InjectedFailure:
        """Answer the next ``times`` REST requests matching ``method`` (``"*"`` for any) and
        ``path_pattern`` (a glob over the path after ``/api/v10``, e.g. ``"/channels/*/messages"``,
        or a compiled regex) with an error, before the token is checked. Unknown routes answer 404.

        429 sends Discord's body ``{"message": "You are being rate limited.", "retry_after": x,
        "global": false}`` with ``Retry-After``, ``X-RateLimit-*`` and ``Via`` headers, so discord.py
        sleeps and retries on its own. Other statuses send ``{"message", "code"}``; defaults: 403 →
        50013 "Missing Permissions", 400 → 50035 "Invalid Form Body", 404 → 10003 "Unknown
        Channel", 5xx → 0 (discord.py retries 500/502/504 after 1 s, 3 s ...)."""
        defaults = {
            400: (50035, "Invalid Form Body"),
            401: (0, "401: Unauthorized"),
            403: (50013, "Missing Permissions"),
            404: (10003, "Unknown Channel"),
            429: (0, "You are being rate limited."),
        }
        default_code, default_message = defaults.get(status, (0, f"{status}: Server Error"))
        failure = InjectedFailure(
            method=method, path_pattern=path_pattern, status=status, times=times, retry_after=retry_after,
            global_=global_, code=default_code if code is None else code,
            message=default_message if message is None else message, body=body,
        )
        self._failures.append(failure)
        return failure

    def _failure_response(self, failure: InjectedFailure, bucket: str) -> web.Response:
        if failure.status == 429:
            body = failure.body or {"message": failure.message, "retry_after": failure.retry_after,
                                    "global": failure.global_}
            headers = {
                "Retry-After": str(max(1, math.ceil(failure.retry_after))),
                "X-RateLimit-Scope": "global" if failure.global_ else "user",
            }
            if failure.global_:
                headers["X-RateLimit-Global"] = "true"
            else:
                headers.update({
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + failure.retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{failure.retry_after:.3f}",
                    "X-RateLimit-Bucket": bucket,
                })
            return self._json(body, status=429, headers=headers)
        body = failure.body or {"message": failure.message, "code": failure.code}
        return self._json(body, status=failure.status)

    # ---------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, *, interval: float = 0.01,
                       message: Optional[str] = None) -> Any:
        """Poll ``predicate()`` until it returns something truthy, and return that; raise
        ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout}s: {message or predicate!r}")
            await asyncio.sleep(interval)

    # ================================================================ gateway server

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        compress = query.get("compress")
        info = GatewayConnectionInfo(path=request.path, query=query, compress=compress, time=time.monotonic())
        self.gateway_connections.append(info)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        try:
            compressor = _Compressor(compress)
        except (ValueError, ImportError):
            compressor = _Compressor(None)
            conn = _GatewayConnection(ws, compressor, info)
            await conn.close(4000, f"Unsupported compression {compress!r}")
            return ws
        conn = _GatewayConnection(ws, compressor, info)
        self._connections.add(conn)
        try:
            if query.get("encoding", "json") != "json":
                await conn.close(4002, "Error while decoding payload.")
                return ws
            if query.get("v", str(API_VERSION)) != str(API_VERSION):
                await conn.close(4012, "Invalid API version.")
                return ws
            await conn.send({"op": _OP_HELLO, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000),
                                                    "_trace": ["fake-gateway"]}, "s": None, "t": None})
            while not ws.closed:
                msg = await ws.receive()
                if msg.type is WSMsgType.CLOSE and info.close_code is None:
                    info.close_code = int(msg.data)
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    await conn.close(4002, "Error while decoding payload.")
                    break
                await self._on_gateway_payload(conn, payload)
                if ws.closed:
                    break
        finally:
            if info.closed_by is None:
                info.closed_by = "client"
                if info.close_code is None:
                    info.close_code = ws.close_code
            session = conn.session
            if session is not None:
                async with session.lock:
                    if session.conn is conn:
                        session.conn = None
                # Discord ends a session when the client closes with 1000/1001.
                if not conn.closed_by_server and info.close_code in (1000, 1001):
                    self._sessions.pop(session.session_id, None)
            self._connections.discard(conn)
        return ws

    async def _on_gateway_payload(self, conn: _GatewayConnection, payload: Mapping[str, Any]) -> None:
        op = payload.get("op")
        data = payload.get("d")
        if op == _OP_HEARTBEAT:
            self.heartbeats += 1
            await conn.send({"op": _OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})
        elif op == _OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == _OP_RESUME:
            await self._resume(conn, data or {})
        elif conn.session is None:
            await conn.close(4003, "Not authenticated.")
        elif op == _OP_PRESENCE:
            self.presence_updates.append(data)
        elif op == _OP_VOICE:
            pass
        elif op == _OP_REQUEST_MEMBERS:
            await self._request_members(conn.session, data or {})
        else:
            await conn.close(4001, "Unknown opcode.")

    def _guild_create_payload(self, g: _Guild, intents: int) -> dict[str, Any]:
        data = copy.deepcopy(g.data)
        # Without GUILD_MEMBERS Discord sends only the bot's own member (and voice members).
        members = g.members.values() if intents & Intent.GUILD_MEMBERS else [g.members[self.bot_id]]
        data.update(
            roles=[copy.deepcopy(r) for r in g.roles.values()],
            members=[copy.deepcopy(m) for m in members],
            member_count=len(g.members),
            channels=[{k: v for k, v in self._channels[c].items() if k != "guild_id"} for c in g.channel_ids],
            threads=[copy.deepcopy(self._channels[t]) for t in g.thread_ids],
            emojis=[], stickers=[], presences=[], voice_states=[], stage_instances=[],
            guild_scheduled_events=[], soundboard_sounds=[],
            large=False, unavailable=False, lazy=True,
            joined_at=g.members[self.bot_id]["joined_at"],
            application_id=None,
        )
        return data

    async def _identify(self, conn: _GatewayConnection, data: Mapping[str, Any]) -> None:
        self.identify_payloads.append(copy.deepcopy(dict(data)))
        if conn.session is not None:
            await conn.close(4005, "Already authenticated.")
            return
        if data.get("token") != self.token:
            await conn.close(4004, "Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int):
            await conn.close(4013, "Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self.allowed_privileged_intents:
            await conn.close(4014, "Disallowed intent(s).")
            return
        shard = list(data.get("shard") or [0, 1])
        session = _GatewaySession(session_id=secrets.token_hex(16), intents=intents, shard=shard)
        conn.session = session
        guilds = [g for g in self._guilds.values() if (g.id >> 22) % shard[1] == shard[0]]
        async with session.lock:
            self._sessions[session.session_id] = session
            session.conn = conn
            ready = {
                "v": API_VERSION,
                "user": dict(self.bot_user),
                "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
                "session_id": session.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.resume_gateway_url,
                "shard": shard,
                "application": {"id": str(self.application_id), "flags": self._application_flags()},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "user_settings": {},
                "auth": {},
                "_trace": ["fake-gateway"],
            }
            await self._dispatch_locked(session, "READY", ready)
            for g in guilds:
                await self._dispatch_locked(session, "GUILD_CREATE", self._guild_create_payload(g, intents))
        session.ready.set()

    async def _resume(self, conn: _GatewayConnection, data: Mapping[str, Any]) -> None:
        self.resume_payloads.append(copy.deepcopy(dict(data)))
        if data.get("token") != self.token:
            await conn.close(4004, "Authentication failed.")
            return
        session = self._sessions.get(str(data.get("session_id")))
        if session is None:
            await conn.send({"op": _OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        last_seq = data.get("seq") or 0
        async with session.lock:
            old = session.conn
            session.conn = conn
            conn.session = session
            for payload in session.backlog:
                if payload["s"] > last_seq:
                    await conn.send(payload)
            # RESUMED takes a sequence number but is not itself replayed later.
            session.seq += 1
            await conn.send({"op": _OP_DISPATCH, "t": "RESUMED", "s": session.seq, "d": {"_trace": ["fake-gateway"]}})
        session.ready.set()
        if old is not None and old is not conn and not old.ws.closed:
            await old.close(4000, "Session resumed elsewhere")

    async def _request_members(self, session: _GatewaySession, data: Mapping[str, Any]) -> None:
        guild_ids = data.get("guild_id")
        if not isinstance(guild_ids, list):
            guild_ids = [guild_ids]
        query = data.get("query")
        user_ids = data.get("user_ids")
        if user_ids is not None and not isinstance(user_ids, list):
            user_ids = [user_ids]
        limit = data.get("limit") or 0
        for gid in guild_ids:
            g = self._guilds.get(int(gid))
            if g is None:
                continue
            members = list(g.members.values())
            if user_ids is not None:
                wanted = {str(u) for u in user_ids}
                members = [m for m in members if m["user"]["id"] in wanted]
            elif query:
                members = [m for m in members if m["user"]["username"].lower().startswith(str(query).lower())]
            if limit:
                members = members[:limit]
            chunk = {"guild_id": str(g.id), "members": copy.deepcopy(members), "chunk_index": 0, "chunk_count": 1,
                     "not_found": []}
            if data.get("nonce") is not None:
                chunk["nonce"] = data["nonce"]
            await self._dispatch_to(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _application_flags(self) -> int:
        flags = 1 << 23  # APPLICATION_COMMAND_BADGE
        if self.allowed_privileged_intents & Intent.GUILD_PRESENCES:
            flags |= 1 << 13  # GATEWAY_PRESENCE_LIMITED
        if self.allowed_privileged_intents & Intent.GUILD_MEMBERS:
            flags |= 1 << 15  # GATEWAY_GUILD_MEMBERS_LIMITED
        if self.allowed_privileged_intents & Intent.MESSAGE_CONTENT:
            flags |= 1 << 19  # GATEWAY_MESSAGE_CONTENT_LIMITED
        return flags

    # ================================================================ REST server

    @staticmethod
    def _json(body: Any, status: int = 200, headers: Optional[Mapping[str, str]] = None) -> web.Response:
        # discord.py parses JSON only when Content-Type is exactly "application/json".
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        return web.Response(body=_dumps(body).encode("utf-8"), status=status, headers=all_headers)

    def _error(self, status: int, code: int, message: str, errors: Optional[dict[str, Any]] = None) -> web.Response:
        body: dict[str, Any] = {"message": message, "code": code}
        if errors is not None:
            body["errors"] = errors
        return self._json(body, status=status)

    @staticmethod
    def _no_content() -> web.Response:
        return web.Response(status=204)

    def _routes(self) -> list[tuple[str, "re.Pattern[str]", _Handler, bool]]:
        # (method, path regex, handler, needs bot Authorization)
        cid = r"(?P<channel_id>\d+)"
        mid = r"(?P<message_id>\d+)"
        hook = r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)"
        table: list[tuple[str, str, _Handler, bool]] = [
            ("GET", r"/gateway", self._get_gateway, False),
            ("GET", r"/gateway/bot", self._get_gateway_bot, True),
            ("GET", r"/users/@me", self._get_me, True),
            ("GET", r"/oauth2/applications/@me", self._get_application, True),
            ("GET", r"/applications/@me", self._get_application, True),
            ("GET", r"/users/(?P<user_id>\d+)", self._get_user, True),
            ("POST", r"/users/@me/channels", self._create_dm, True),
            ("GET", rf"/channels/{cid}", self._get_channel, True),
            ("GET", rf"/channels/{cid}/messages", self._get_messages, True),
            ("POST", rf"/channels/{cid}/messages", self._create_message, True),
            ("GET", rf"/channels/{cid}/messages/{mid}", self._get_message, True),
            ("PATCH", rf"/channels/{cid}/messages/{mid}", self._edit_message, True),
            ("DELETE", rf"/channels/{cid}/messages/{mid}", self._delete_message, True),
            ("POST", rf"/channels/{cid}/typing", self._trigger_typing, True),
            ("GET", r"/guilds/(?P<guild_id>\d+)", self._get_guild, True),
            ("GET", r"/guilds/(?P<guild_id>\d+)/channels", self._get_guild_channels, True),
            ("GET", r"/guilds/(?P<guild_id>\d+)/members/(?P<user_id>\d+)", self._get_member, True),
            ("GET", r"/applications/(?P<app_id>\d+)/commands", self._get_commands, True),
            ("PUT", r"/applications/(?P<app_id>\d+)/commands", self._put_commands, True),
            ("GET", r"/applications/(?P<app_id>\d+)/guilds/(?P<guild_id>\d+)/commands", self._get_commands, True),
            ("PUT", r"/applications/(?P<app_id>\d+)/guilds/(?P<guild_id>\d+)/commands", self._put_commands, True),
            ("POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback",
             self._interaction_callback, False),
            ("POST", hook, self._create_followup, False),
            ("GET", hook + r"/messages/(?P<message_id>@original|\d+)", self._get_webhook_message, False),
            ("PATCH", hook + r"/messages/(?P<message_id>@original|\d+)", self._edit_webhook_message, False),
            ("DELETE", hook + r"/messages/(?P<message_id>@original|\d+)", self._delete_webhook_message, False),
        ]
        return [(m, re.compile(p), h, auth) for m, p, h, auth in table]

    @staticmethod
    def _bucket(method: str, template: str) -> str:
        return hashlib.sha1(f"{method} {template}".encode()).hexdigest()[:32]

    async def _read_body(self, request: web.Request) -> tuple[Any, list[tuple[str, str, Optional[str], bytes]]]:
        files: list[tuple[str, str, Optional[str], bytes]] = []
        if not request.body_exists:
            return None, files
        if request.content_type.startswith("multipart/"):
            payload: Any = None
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())  # type: ignore[union-attr]
                else:
                    data = await part.read()  # type: ignore[union-attr]
                    files.append((part.name or "", part.filename or "file.bin",  # type: ignore[union-attr]
                                  part.headers.get("Content-Type"), bytes(data)))
            return payload, files
        raw = await request.read()
        if not raw:
            return None, files
        try:
            return json.loads(raw), files
        except ValueError:
            return raw.decode("utf-8", "replace"), files

    async def _rest_handler(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"].rstrip("/")
        method = request.method.upper()
        body, files = await self._read_body(request)
        record = RecordedRequest(method=method, path=path, query=dict(request.query), json=body,
                                 time=time.monotonic(), files=[f[1] for f in files])
        self.requests.append(record)
        response = await self._route(request, method, path, body, files)
        record.status = response.status
        response.headers["Via"] = "1.1 google"
        return response

    async def _route(self, request: web.Request, method: str, path: str, body: Any,
                     files: list[tuple[str, str, Optional[str], bytes]]) -> web.StreamResponse:
        path_matched = False
        for route_method, pattern, handler, needs_auth in self._route_table:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            path_matched = True
            if route_method != method:
                continue
            bucket = self._bucket(route_method, pattern.pattern)
            for failure in self._failures:
                if not failure.exhausted and failure.matches(method, path):
                    failure.hits += 1
                    return self._failure_response(failure, bucket)
            if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return self._error(401, 0, "401: Unauthorized")
            call = _Call(request=request, method=method, path=path, params=match.groupdict(), json=body, files=files)
            response = await handler(call)
            if response.status < 300:
                response.headers.update({
                    "X-RateLimit-Limit": "50",
                    "X-RateLimit-Remaining": "49",
                    "X-RateLimit-Reset": f"{time.time() + 1:.3f}",
                    "X-RateLimit-Reset-After": "1.000",
                    "X-RateLimit-Bucket": bucket,
                })
            return response
        for failure in self._failures:
            if not failure.exhausted and failure.matches(method, path):
                failure.hits += 1
                return self._failure_response(failure, self._bucket(method, path))
        if path_matched:
            return self._error(405, 0, "405: Method Not Allowed")
        return self._error(404, 0, "404: Not Found")

    async def _attachment_handler(self, request: web.Request) -> web.StreamResponse:
        data = self._attachments.get(int(request.match_info["attachment_id"]))
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")

    # ---------------------------------------------------------------- REST: identity

    async def _get_gateway(self, call: _Call) -> web.Response:
        return self._json({"url": self.gateway_url})

    async def _get_gateway_bot(self, call: _Call) -> web.Response:
        return self._json({
            "url": self.gateway_url,
            "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000,
                                    "max_concurrency": 1},
        })

    async def _get_me(self, call: _Call) -> web.Response:
        return self._json(self.bot_user)

    async def _get_application(self, call: _Call) -> web.Response:
        return self._json({
            "id": str(self.application_id),
            "name": self.bot_user["username"],
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": self._application_flags(),
            "owner": self.owner_user,
            "team": None,
            "bot": self.bot_user,
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
            "approximate_guild_count": len(self._guilds),
        })

    async def _get_user(self, call: _Call) -> web.Response:
        user = self._users.get(int(call.params["user_id"]))
        if user is None:
            return self._error(404, 10013, "Unknown User")
        return self._json(user)

    async def _create_dm(self, call: _Call) -> web.Response:
        recipient = (call.json or {}).get("recipient_id")
        if recipient is None or int(recipient) not in self._users:
            return self._error(400, 50033, "Invalid Recipient(s)")
        return self._json(self.dm_channel(int(recipient)))

    async def _get_guild(self, call: _Call) -> web.Response:
        g = self._guilds.get(int(call.params["guild_id"]))
        if g is None or self.bot_id not in g.members:
            return self._error(404, 10004, "Unknown Guild")
        data = copy.deepcopy(g.data)
        data.update(roles=list(g.roles.values()), emojis=[], stickers=[],
                    approximate_member_count=len(g.members))
        return self._json(data)

    async def _get_guild_channels(self, call: _Call) -> web.Response:
        g = self._guilds.get(int(call.params["guild_id"]))
        if g is None:
            return self._error(404, 10004, "Unknown Guild")
        return self._json([self._channels[c] for c in g.channel_ids])

    async def _get_member(self, call: _Call) -> web.Response:
        g = self._guilds.get(int(call.params["guild_id"]))
        if g is None:
            return self._error(404, 10004, "Unknown Guild")
        member = g.members.get(int(call.params["user_id"]))
        if member is None:
            return self._error(404, 10007, "Unknown Member")
        return self._json(member)

    # ---------------------------------------------------------------- REST: channels and messages

    def _channel_or_404(self, call: _Call) -> Union[dict[str, Any], web.Response]:
        ch = self._channels.get(int(call.params["channel_id"]))
        if ch is None:
            return self._error(404, 10003, "Unknown Channel")
        return ch

    async def _get_channel(self, call: _Call) -> web.Response:
        ch = self._channel_or_404(call)
        return ch if isinstance(ch, web.Response) else self._json(ch)

    async def _trigger_typing(self, call: _Call) -> web.Response:
        ch = self._channel_or_404(call)
        if isinstance(ch, web.Response):
            return ch
        self.typing.append(TypingEvent(channel_id=int(ch["id"]), time=time.monotonic()))
        return self._no_content()

    def _validate_content(self, body: Mapping[str, Any]) -> Optional[web.Response]:
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            return self._error(400, 50035, "Invalid Form Body", {"content": {"_errors": [
                {"code": "STRING_TYPE_CONVERT", "message": "Could not interpret value as string."}]}})
        if content is not None and len(content) > MAX_MESSAGE_LENGTH:
            return self._error(400, 50035, "Invalid Form Body", {"content": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {MAX_MESSAGE_LENGTH} or fewer in length."}]}})
        if len(body.get("embeds") or ()) > 10:
            return self._error(400, 50035, "Invalid Form Body", {"embeds": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 10 or fewer in length."}]}})
        problem = self._component_problem(body.get("components"))
        if problem is not None:
            return self._error(400, 50035, "Invalid Form Body", {"components": {"_errors": [
                {"code": "COMPONENT_INVALID", "message": problem}]}})
        return None

    @staticmethod
    def _component_problem(rows: Any) -> Optional[str]:
        """What Discord would refuse in a message's (classic) components: at most 5 action rows
        (type 1) of at most 5 buttons (type 2), each with a label of at most 80 characters and,
        unless it is a link (style 5), a custom_id of 1-100 characters unique in the message."""
        if rows is None:
            return None
        if not isinstance(rows, list) or len(rows) > 5:
            return "Must be a list of at most 5 action rows."
        seen: set[str] = set()
        for row in rows:
            if not isinstance(row, dict) or row.get("type") != 1:
                return "Top-level components must be action rows (type 1)."
            items = row.get("components")
            if not isinstance(items, list) or not 1 <= len(items) <= 5:
                return "An action row holds 1 to 5 components."
            for item in items:
                if not isinstance(item, dict) or item.get("type") != 2:
                    continue  # select menus and the like: not checked here
                if len(str(item.get("label") or "")) > 80:
                    return "A button label is at most 80 characters."
                if item.get("style") == 5:
                    if not item.get("url"):
                        return "A link button needs a url."
                    continue
                custom_id = item.get("custom_id")
                if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100:
                    return "A button needs a custom_id of 1 to 100 characters."
                if custom_id in seen:
                    return "Component custom id cannot be duplicated."
                seen.add(custom_id)
        return None

    @staticmethod
    def _is_empty(content: Optional[str], body: Mapping[str, Any], attachments: Sequence[Any]) -> bool:
        return not (content or body.get("embeds") or attachments or body.get("sticker_ids")
                    or body.get("components") or body.get("poll"))

    def _uploaded(self, channel_id: int, body: Mapping[str, Any], files: Sequence[tuple[str, str, Optional[str], bytes]]
                  ) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
        described = {str(a.get("id")): a for a in body.get("attachments") or ()}
        payloads, blobs = [], {}
        for index, (_field, filename, content_type, data) in enumerate(files):
            meta = described.get(str(index), {})
            payloads.append(self._attachment_payload(channel_id, meta.get("filename", filename), data, content_type,
                                                     meta.get("description")))
            blobs[filename] = data
        return payloads, blobs

    def _bot_author(self) -> dict[str, Any]:
        return {k: self.bot_user[k] for k in ("id", "username", "discriminator", "global_name", "avatar",
                                              "public_flags", "bot")}

    async def _create_message(self, call: _Call) -> web.Response:
        ch = self._channel_or_404(call)
        if isinstance(ch, web.Response):
            return ch
        body = call.json if isinstance(call.json, dict) else {}
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        channel_id = int(ch["id"])
        guild_id = self._channel_guild_id(ch)
        attachments, blobs = self._uploaded(channel_id, body, call.files)
        content = body.get("content")
        if self._is_empty(content, body, attachments):
            return self._error(400, 50006, "Cannot send an empty message")
        reference = body.get("message_reference")
        replied_author = None
        if reference:
            ref_msg = self._all_messages.get(int(reference.get("message_id", 0)))
            wrong_channel = ref_msg is not None and reference.get("channel_id") and (
                str(reference["channel_id"]) != ref_msg["channel_id"])
            if ref_msg is None or wrong_channel:
                if reference.get("fail_if_not_exists", True):
                    return self._error(400, 50035, "Invalid Form Body", {"message_reference": {"_errors": [
                        {"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]}})
                reference = None
            else:
                replied_author = int(ref_msg["author"]["id"])
        allowed = body.get("allowed_mentions")
        user_ids, role_ids, everyone = self._resolve_mentions(content, allowed, replied_author, guild_id)
        mid = self._snowflake()
        msg = self._message_payload(
            message_id=mid, channel=ch, author=self._bot_author(), content=content or "", mentions=user_ids,
            mention_roles=role_ids, mention_everyone=everyone, reference=reference, attachments=attachments,
            embeds=body.get("embeds") or (), flags=int(body.get("flags") or 0),
            components=body.get("components") or (),
        )
        if body.get("nonce") is not None:
            msg["nonce"] = body["nonce"]
        self._all_messages[mid] = msg
        ch["last_message_id"] = msg["id"]
        record = BotMessage(
            id=mid, kind="channel", channel_id=channel_id, guild_id=guild_id, content=content,
            revisions=[content], allowed_mentions=allowed, message_reference=body.get("message_reference"),
            flags=msg["flags"], embeds=list(body.get("embeds") or ()), attachments=attachments,
            pinged_user_ids=tuple(user_ids), payload=body, created_at=time.monotonic(), files=blobs,
            components=copy.deepcopy(msg["components"]),
        )
        self._bot_messages[mid] = record
        self.messages.append(record)
        if self.echo_bot_messages and self._sessions:
            await self._dispatch_message_event("MESSAGE_CREATE", msg)
        return self._json(msg)

    def _message_in_channel(self, call: _Call) -> Union[dict[str, Any], web.Response]:
        ch = self._channel_or_404(call)
        if isinstance(ch, web.Response):
            return ch
        msg = self._all_messages.get(int(call.params["message_id"]))
        if msg is None or msg["channel_id"] != ch["id"]:
            return self._error(404, 10008, "Unknown Message")
        return msg

    async def _get_message(self, call: _Call) -> web.Response:
        msg = self._message_in_channel(call)
        return msg if isinstance(msg, web.Response) else self._json(msg)

    async def _get_messages(self, call: _Call) -> web.Response:
        ch = self._channel_or_404(call)
        if isinstance(ch, web.Response):
            return ch
        limit = max(1, min(100, int(call.query.get("limit", 50))))
        msgs = sorted((m for m in self._all_messages.values() if m["channel_id"] == ch["id"]),
                      key=lambda m: int(m["id"]), reverse=True)
        if "before" in call.query:
            msgs = [m for m in msgs if int(m["id"]) < int(call.query["before"])]
        if "after" in call.query:
            msgs = [m for m in msgs if int(m["id"]) > int(call.query["after"])][-limit:]
        return self._json(msgs[:limit])

    def _apply_edit(self, record: BotMessage, msg: dict[str, Any], body: Mapping[str, Any],
                    uploaded: Sequence[dict[str, Any]] = ()) -> Optional[web.Response]:
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        content = body["content"] if "content" in body else msg.get("content")
        if "attachments" in body or uploaded:
            # Discord keeps the listed existing attachments and adds the uploaded files.
            keep = {str(a.get("id")) for a in body.get("attachments") or ()}
            new_attachments = [a for a in msg.get("attachments", []) if a["id"] in keep] + list(uploaded)
        else:
            new_attachments = msg.get("attachments", [])
        merged = {**msg, **{k: v for k, v in body.items() if k in ("embeds", "components")}}
        if self._is_empty(content, merged, new_attachments):
            return self._error(400, 50006, "Cannot send an empty message")
        msg["content"] = content or ""
        msg["attachments"] = new_attachments
        if "embeds" in body:
            msg["embeds"] = body["embeds"] or []
        if "components" in body:
            msg["components"] = copy.deepcopy(body["components"] or [])
            record.components = copy.deepcopy(msg["components"])
        if "flags" in body and body["flags"] is not None:
            msg["flags"] = int(body["flags"]) | (msg["flags"] & _EPHEMERAL)
        msg["flags"] &= ~_LOADING
        msg["edited_timestamp"] = _now_iso()
        if "allowed_mentions" in body:
            record.allowed_mentions = body["allowed_mentions"]
        record.content = content
        record.revisions.append(content)
        record.flags = msg["flags"]
        record.embeds = list(msg["embeds"])
        record.attachments = list(new_attachments)
        record.payload = dict(body)
        self.edits.append(Edit(message_id=record.id, kind=record.kind, channel_id=record.channel_id, content=content,
                               payload=dict(body), time=time.monotonic()))
        return None

    async def _edit_message(self, call: _Call) -> web.Response:
        msg = self._message_in_channel(call)
        if isinstance(msg, web.Response):
            return msg
        record = self._bot_messages.get(int(msg["id"]))
        if record is None:
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        body = call.json if isinstance(call.json, dict) else {}
        uploaded, blobs = self._uploaded(int(msg["channel_id"]), body, call.files)
        failed = self._apply_edit(record, msg, body, uploaded)
        if failed is not None:
            return failed
        record.files.update(blobs)
        if self.echo_bot_messages and self._sessions:
            await self._dispatch_message_event("MESSAGE_UPDATE", msg)
        return self._json(msg)

    async def _delete_message(self, call: _Call) -> web.Response:
        msg = self._message_in_channel(call)
        if isinstance(msg, web.Response):
            return msg
        mid = int(msg["id"])
        del self._all_messages[mid]
        record = self._bot_messages.get(mid)
        if record is not None:
            record.deleted = True
        if self.echo_bot_messages and self._sessions:
            await self._dispatch_message_event("MESSAGE_DELETE", self._delete_payload(msg))
        return self._no_content()

    # ---------------------------------------------------------------- REST: application commands

    def _command_scope(self, call: _Call) -> Union[Optional[int], web.Response]:
        if int(call.params["app_id"]) != self.application_id:
            return self._error(403, 50001, "Missing Access")
        if "guild_id" not in call.params:
            return None
        gid = int(call.params["guild_id"])
        if gid not in self._guilds or self.bot_id not in self._guilds[gid].members:
            return self._error(403, 50001, "Missing Access")
        return gid

    async def _get_commands(self, call: _Call) -> web.Response:
        scope = self._command_scope(call)
        if isinstance(scope, web.Response):
            return scope
        return self._json(self.synced_commands.get(scope, []))

    async def _put_commands(self, call: _Call) -> web.Response:
        scope = self._command_scope(call)
        if isinstance(scope, web.Response):
            return scope
        payload = call.json if isinstance(call.json, list) else []
        errors: dict[str, Any] = {}
        seen: set[tuple[int, str]] = set()
        for index, cmd in enumerate(payload):
            kind = int(cmd.get("type", 1))
            name = str(cmd.get("name", ""))
            problems = {}
            if kind == 1 and (not _COMMAND_NAME.match(name) or name != name.lower()):
                problems["name"] = {"_errors": [{"code": "APPLICATION_COMMAND_INVALID_NAME",
                                                 "message": "Command name is invalid"}]}
            if kind == 1 and not 1 <= len(cmd.get("description") or "") <= 100:
                problems["description"] = {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH",
                                                        "message": "Must be between 1 and 100 in length."}]}
            if (kind, name) in seen:
                problems["name"] = {"_errors": [{"code": "APPLICATION_COMMANDS_DUPLICATE_NAME",
                                                 "message": "Application command names must be unique"}]}
            seen.add((kind, name))
            if problems:
                errors[str(index)] = problems
        if len(payload) > 100:
            errors["_errors"] = [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 100 or fewer in length."}]
        if errors:
            return self._error(400, 50035, "Invalid Form Body", errors)
        stored = []
        for cmd in payload:
            kind = int(cmd.get("type", 1))
            key = (scope, kind, cmd["name"])
            cid = self._command_ids.setdefault(key, self._snowflake())
            entry = {
                "id": str(cid),
                "application_id": str(self.application_id),
                "version": str(self._snowflake()),
                "type": kind,
                "name": cmd["name"],
                "description": cmd.get("description", ""),
                "options": cmd.get("options", []),
                "default_member_permissions": (None if cmd.get("default_member_permissions") is None
                                               else str(int(cmd["default_member_permissions"]))),
                "dm_permission": cmd.get("dm_permission", True),
                "contexts": cmd.get("contexts"),
                "integration_types": cmd.get("integration_types", [0]),
                "nsfw": cmd.get("nsfw", False),
                "name_localizations": cmd.get("name_localizations"),
                "description_localizations": cmd.get("description_localizations"),
            }
            if scope is not None:
                entry["guild_id"] = str(scope)
            stored.append(entry)
        self.synced_commands[scope] = stored
        return self._json(stored)

    # ---------------------------------------------------------------- REST: interactions

    def _interaction_message(self, interaction: _Interaction, *, kind: str, body: Mapping[str, Any], flags: int,
                             attachments: list[dict[str, Any]], blobs: dict[str, bytes]
                             ) -> tuple[BotMessage, dict[str, Any]]:
        ch = self._channels[interaction.channel_id]
        content = body.get("content")
        allowed = body.get("allowed_mentions")
        user_ids, role_ids, everyone = self._resolve_mentions(content, allowed, None, interaction.guild_id)
        mid = self._snowflake()
        msg = self._message_payload(
            message_id=mid, channel=ch, author=self._bot_author(), content=content or "", mentions=user_ids,
            mention_roles=role_ids, mention_everyone=everyone, attachments=attachments,
            embeds=body.get("embeds") or (), flags=flags, components=body.get("components") or (),
        )
        msg.update(
            type=20 if kind == "interaction_response" else 0,
            webhook_id=str(self.application_id),
            application_id=str(self.application_id),
            interaction_metadata={"id": str(interaction.id), "type": interaction.payload["type"],
                                  "user": self._users[interaction.user_id],
                                  "authorizing_integration_owners": interaction.payload.get(
                                      "authorizing_integration_owners", {})},
        )
        self._all_messages[mid] = msg
        record = BotMessage(
            id=mid, kind=kind, channel_id=interaction.channel_id, guild_id=interaction.guild_id, content=content,
            revisions=[content], allowed_mentions=allowed, message_reference=None, flags=flags,
            embeds=list(body.get("embeds") or ()), attachments=attachments, pinged_user_ids=tuple(user_ids),
            payload=dict(body), created_at=time.monotonic(), interaction_id=interaction.id, files=blobs,
            components=copy.deepcopy(msg["components"]),
        )
        self._bot_messages[mid] = record
        return record, msg

    async def _interaction_callback(self, call: _Call) -> web.Response:
        interaction = self._interactions.get(int(call.params["interaction_id"]))
        if interaction is None or interaction.token != call.params["token"]:
            return self._error(404, 10062, "Unknown interaction")
        if interaction.response is not None:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        body = call.json if isinstance(call.json, dict) else {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        message: Optional[BotMessage] = None
        msg_payload: Optional[dict[str, Any]] = None
        if kind == 4:
            invalid = self._validate_content(data)
            if invalid is not None:
                return invalid
            attachments, blobs = self._uploaded(interaction.channel_id, data, call.files)
            if self._is_empty(data.get("content"), data, attachments):
                return self._error(400, 50006, "Cannot send an empty message")
            message, msg_payload = self._interaction_message(interaction, kind="interaction_response", body=data,
                                                             flags=flags, attachments=attachments, blobs=blobs)
        elif kind == 5:
            message, msg_payload = self._interaction_message(interaction, kind="interaction_response", body={},
                                                             flags=(flags & _EPHEMERAL) | _LOADING,
                                                             attachments=[], blobs={})
            interaction.deferred_placeholder_pending = True
        elif kind in (6, 7) and interaction.message_id is None:
            return self._error(400, 50035, "Invalid Form Body", {"type": {"_errors": [
                {"code": "INTERACTION_CALLBACK_TYPE_INVALID",
                 "message": "This callback type is only valid for component interactions."}]}})
        elif kind == 7:  # UPDATE_MESSAGE: edit the message the component is on
            target = self._bot_messages.get(interaction.message_id)
            msg = self._all_messages.get(interaction.message_id)
            if target is None or msg is None:
                return self._error(404, 10008, "Unknown Message")
            failed = self._apply_edit(target, msg, data)
            if failed is not None:
                return failed
            if self.echo_bot_messages and target.kind == "channel" and self._sessions:
                await self._dispatch_message_event("MESSAGE_UPDATE", msg)
        elif kind not in (1, 6, 8, 9, 10, 12):
            return self._error(400, 50035, "Invalid Form Body", {"type": {"_errors": [
                {"code": "BASE_TYPE_CHOICES", "message": "Value must be one of the interaction callback types."}]}})
        response = InteractionResponse(interaction_id=interaction.id, type=kind, flags=flags,
                                       content=data.get("content"), data=body.get("data"), time=time.monotonic(),
                                       message=message)
        interaction.response = response
        interaction.original = message
        self.interaction_responses.append(response)
        if call.query.get("with_response") not in ("1", "true", "True"):
            return self._no_content()
        result: dict[str, Any] = {"interaction": {
            "id": str(interaction.id),
            "type": interaction.payload["type"],
            "response_message_loading": kind == 5,
            "response_message_ephemeral": bool(flags & _EPHEMERAL),
        }}
        if message is not None and msg_payload is not None:
            result["interaction"]["response_message_id"] = str(message.id)
            result["resource"] = {"type": kind, "message": msg_payload}
        return self._json(result)

    def _webhook_interaction(self, call: _Call) -> Union[_Interaction, web.Response]:
        interaction = self._interactions_by_token.get(call.params["token"])
        if interaction is None or int(call.params["app_id"]) != self.application_id:
            return self._error(404, 10015, "Unknown Webhook")
        return interaction

    async def _create_followup(self, call: _Call) -> web.Response:
        interaction = self._webhook_interaction(call)
        if isinstance(interaction, web.Response):
            return interaction
        if interaction.response is None:
            return self._error(404, 10015, "Unknown Webhook")
        body = call.json if isinstance(call.json, dict) else {}
        invalid = self._validate_content(body)
        if invalid is not None:
            return invalid
        attachments, blobs = self._uploaded(interaction.channel_id, body, call.files)
        if self._is_empty(body.get("content"), body, attachments):
            return self._error(400, 50006, "Cannot send an empty message")
        original = interaction.original
        if interaction.deferred_placeholder_pending and original is not None:
            # Discord: the first followup after a deferral fills the "thinking" message, keeping
            # the deferral's ephemeral state.
            interaction.deferred_placeholder_pending = False
            msg = self._all_messages[original.id]
            edit_body = {k: v for k, v in body.items() if k != "flags"}
            edit_body.setdefault("content", None)
            failed = self._apply_edit(original, msg, edit_body, attachments)
            if failed is not None:
                return failed
            original.files.update(blobs)
            self.followups.append(original)
            return self._json(msg) if call.query.get("wait") in ("1", "true", "True") else self._no_content()
        record, msg = self._interaction_message(interaction, kind="followup", body=body,
                                                flags=int(body.get("flags") or 0), attachments=attachments,
                                                blobs=blobs)
        self.followups.append(record)
        if call.query.get("wait") in ("1", "true", "True"):
            return self._json(msg)
        return self._no_content()

    def _webhook_message(self, call: _Call, interaction: _Interaction) -> Union[BotMessage, web.Response]:
        if call.params["message_id"] == "@original":
            record = interaction.original
        else:
            record = self._bot_messages.get(int(call.params["message_id"]))
            if record is not None and record.interaction_id != interaction.id:
                record = None
        if record is None or record.deleted:
            return self._error(404, 10008, "Unknown Message")
        return record

    async def _get_webhook_message(self, call: _Call) -> web.Response:
        interaction = self._webhook_interaction(call)
        if isinstance(interaction, web.Response):
            return interaction
        record = self._webhook_message(call, interaction)
        if isinstance(record, web.Response):
            return record
        return self._json(self._all_messages[record.id])

    async def _edit_webhook_message(self, call: _Call) -> web.Response:
        interaction = self._webhook_interaction(call)
        if isinstance(interaction, web.Response):
            return interaction
        record = self._webhook_message(call, interaction)
        if isinstance(record, web.Response):
            return record
        body = call.json if isinstance(call.json, dict) else {}
        msg = self._all_messages[record.id]
        uploaded, blobs = self._uploaded(interaction.channel_id, body, call.files)
        failed = self._apply_edit(record, msg, body, uploaded)
        if failed is not None:
            return failed
        record.files.update(blobs)
        if record is interaction.original:
            interaction.deferred_placeholder_pending = False
        return self._json(msg)

    async def _delete_webhook_message(self, call: _Call) -> web.Response:
        interaction = self._webhook_interaction(call)
        if isinstance(interaction, web.Response):
            return interaction
        record = self._webhook_message(call, interaction)
        if isinstance(record, web.Response):
            return record
        record.deleted = True
        self._all_messages.pop(record.id, None)
        return self._no_content()

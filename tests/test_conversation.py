"""The conversation layer's own parts, without a model or a database: the command registry and
what is generated from it (/help, Telegram's menu, Discord's slash tree, the permission check),
the rate limit, one rule for effective settings, and the layer's imports."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conversation import (
    COMMANDS,
    Access,
    Argument,
    Command,
    CommandContext,
    CommandRegistry,
    ConversationDefaults,
    JobsPort,
    ParsedCommand,
    UserRateLimit,
    Variant,
    effective_settings,
    parse_command,
)
from bot.conversation import messages
from bot.core.contracts import Outcome, Refusal, RefusalKind
from bot.core.types import Author, ConversationKey, GenerationSettings, IncomingMessage

ROOT = Path(__file__).resolve().parent.parent

# /help's lines before the registry existed: the registry must say the same.
HELP_BEFORE = [
    "/help: this list",
    "/reset [new system prompt]: forget this conversation's history (admins in shared chats)",
    "/system [text | clear | default]: show or set the system prompt (admins in shared chats)",
    "/set key=value ...: temperature (0-2), top_p (0.01-1), max_new_tokens (1-4096), or key=default (admins in shared chats)",
    "/status: model, queue, your place in it, history size and settings",
    "/forget: delete your own messages (and the replies to them) from this conversation",
    "/audit: the last admin actions in this conversation (admins)",
    "/export: your own messages here and the replies to them, as a JSON file",
]


def message(text: str = "/x", *, admin: bool = False, direct: bool = False) -> IncomingMessage:
    return IncomingMessage(
        conversation=ConversationKey("fake", "room"),
        message_id="m1",
        author=Author("u1", "Mallory", is_admin=admin),
        text=text,
        is_direct=direct,
        addressed=True,
    )


def context(incoming: IncomingMessage | None = None) -> CommandContext:
    async def no_health():  # noqa: ANN202
        raise AssertionError("not used")

    defaults = ConversationDefaults(bot_name="Testbot", system_prompt="Be nice.", generation=GenerationSettings())
    return CommandContext(message=incoming or message(), defaults=defaults, repo=None, jobs=None, health=no_health)  # type: ignore[arg-type]


# -- what is generated from the declarations ------------------------------------------------------


async def test_help_lists_every_registered_command():
    result = await COMMANDS.run(context(), ParsedCommand("help", ""))
    lines = result.reply.splitlines()
    assert lines[0] == "Testbot answers your messages with a local language model. Commands:"
    assert lines[1:] == [command.help_line for command in COMMANDS]
    assert {line.split()[0].rstrip(":") for line in lines[1:]} == {f"/{name}" for name in COMMANDS.names()}
    assert [line for line in lines[1:] if not line.startswith("/model")] == HELP_BEFORE
    assert result.outcome is Outcome.COMMAND and result.private


def test_telegram_menu_is_the_registry_plus_start_and_ask():
    pytest.importorskip("telegram")
    from adapters.telegram import MENU

    assert [name for name, _ in MENU] == ["start", "ask", *COMMANDS.names()]
    assert dict(MENU)["set"] == COMMANDS["set"].help
    assert all(1 <= len(description) <= 256 for _, description in MENU)


def test_discord_slash_tree_is_the_registry():
    discord = pytest.importorskip("discord")
    from discord import app_commands

    from adapters.discord import DiscordAdapter

    tree = app_commands.CommandTree(discord.Client(intents=discord.Intents.none()))
    DiscordAdapter._register_commands(None, tree)  # type: ignore[arg-type]  # builds, never calls back
    slash = {command.name: command.to_dict(tree) for command in tree.get_commands()}
    assert list(slash) == list(COMMANDS.names())
    for command in COMMANDS:
        payload = slash[command.name]
        assert payload["description"] == command.short_description
        admins = payload["default_member_permissions"]
        # Only commands that always change something are hidden from members; /system and /set
        # also show, so everyone sees them and Parley refuses a member's change.
        assert admins == (discord.Permissions(manage_guild=True).value if command.access is Access.ADMINS else None)
    system = slash["system"]["options"]
    assert [(o["name"], [p["name"] for p in o["options"]]) for o in system] == [
        ("show", []), ("set", ["text"]), ("clear", []), ("default", [])
    ]
    options = {o["name"]: o for o in slash["set"]["options"]}
    assert (options["temperature"]["type"], options["temperature"]["min_value"], options["temperature"]["max_value"]) == (10, 0.0, 2.0)
    assert (options["max_new_tokens"]["type"], options["max_new_tokens"]["max_value"]) == (4, 4096)
    assert not any(o["required"] for o in options.values())
    assert slash["reset"]["options"][0]["name"] == "system_prompt" and not slash["reset"]["options"][0]["required"]
    assert "model" in slash and slash["model"]["default_member_permissions"] is None


def test_typed_options_turn_back_into_the_command_text():
    system, set_, reset = COMMANDS["system"], COMMANDS["set"], COMMANDS["reset"]
    assert system.text_for("show") == "/system"
    assert system.text_for("set", {"text": "You are a pirate."}) == "/system You are a pirate."
    assert system.text_for("clear") == "/system clear" and system.text_for("default") == "/system default"
    assert set_.text_for(None, {"temperature": 1.5, "top_p": None, "max_new_tokens": 64}) == "/set temperature=1.5 max_new_tokens=64"
    assert reset.text_for(None, {"system_prompt": None}) == "/reset"
    assert parse_command(reset.text_for(None, {"system_prompt": "Be brief."})) == ParsedCommand("reset", "Be brief.")


def test_a_declaration_is_checked():
    async def handler(context, args):  # noqa: ANN001, ANN202
        return ""

    with pytest.raises(ValueError, match="command name"):
        Command("Bad-Name", "x", handler)
    with pytest.raises(ValueError, match="summary"):
        Command("long", "x" * 101, handler)
    with pytest.raises(ValueError, match="declared twice"):
        CommandRegistry((Command("one", "x", handler), Command("one", "y", handler)))


# -- the permission check, in the registry --------------------------------------------------------


def _recording_registry() -> tuple[CommandRegistry, list[str]]:
    ran: list[str] = []

    async def handler(context, args):  # noqa: ANN001, ANN202
        ran.append(f"/{context.command.name} {args}".strip())
        return "done"

    registry = CommandRegistry(
        (
            Command("open", "for everyone", handler),
            Command("wipe", "for admins", handler, access=Access.ADMINS, private=False),
            Command("tune", "show for all, change for admins", handler, access=Access.ADMINS_TO_CHANGE),
        )
    )
    return registry, ran


@pytest.mark.parametrize(("admin", "direct"), [(False, False), (True, False), (False, True)])
async def test_the_registry_checks_permissions_before_any_handler(admin, direct):
    registry, ran = _recording_registry()
    allowed = admin or direct
    for name, args in (("open", ""), ("wipe", ""), ("wipe", "all"), ("tune", ""), ("tune", "x=1")):
        result = await registry.run(context(message(admin=admin, direct=direct)), ParsedCommand(name, args))
        needs_admin = name == "wipe" or (name == "tune" and args)
        assert result.outcome is Outcome.COMMAND
        if needs_admin and not allowed:
            assert result.refusal == Refusal(RefusalKind.NOT_ADMIN, command=name)
            assert result.private and result.reply == messages.render_refusal(result.refusal)
        else:
            assert result.refusal is None and result.reply == "done"
    expected = ["/open", "/wipe", "/wipe all", "/tune", "/tune x=1"] if allowed else ["/open", "/tune"]
    assert ran == expected


async def test_unknown_commands_are_answered_by_the_registry():
    result = await COMMANDS.run(context(), ParsedCommand("frobnicate", ""))
    assert result.reply == "Unknown command /frobnicate. Try /help." and result.refusal is None


def test_admin_commands_are_declared_as_such():
    access = {command.name: command.access for command in COMMANDS}
    assert access["reset"] is Access.ADMINS
    assert access["system"] is access["set"] is Access.ADMINS_TO_CHANGE
    assert access["audit"] is Access.ADMINS
    assert {name for name, a in access.items() if a is Access.EVERYONE} == {"help", "status", "forget", "model", "export"}
    assert {c.name for c in COMMANDS if c.private} == {"help", "status", "forget", "model", "audit", "export"}


def test_variants_and_arguments_are_exclusive():
    async def handler(context, args):  # noqa: ANN001, ANN202
        return ""

    with pytest.raises(ValueError, match="per variant"):
        Command("both", "x", handler, arguments=(Argument("a", "a"),), variants=(Variant("v", "v"),))


# -- the rate limit ---------------------------------------------------------------------------------


def test_rate_limit_is_a_sliding_window_per_user():
    now = [1000.0]
    limit = UserRateLimit(3, clock=lambda: now[0])
    assert [limit.check("fake", "ann") for _ in range(3)] == [None, None, None]
    assert limit.check("fake", "ann") == 60
    assert limit.check("fake", "bob") is None and limit.check("other", "ann") is None
    now[0] += 59.5
    assert limit.check("fake", "ann") == 1  # never "0 s"
    now[0] += 0.6  # the first three are now more than a minute old
    assert limit.check("fake", "ann") is None
    now[0] += 30
    assert [limit.check("fake", "ann") for _ in range(3)] == [None, None, 30]


# -- one rule for a conversation's settings ---------------------------------------------------------


@settings(deadline=None)  # the first example configures SQLAlchemy's mappers
@given(
    temperature=st.one_of(st.none(), st.sampled_from([0.0, 0.7, 2.0])),
    top_p=st.one_of(st.none(), st.sampled_from([0.01, 1.0])),
    max_new_tokens=st.one_of(st.none(), st.integers(1, 4096)),
)
def test_a_stored_conversations_settings_have_one_rule(temperature, top_p, max_new_tokens):
    from storage import Conversation

    conversation = Conversation(
        platform="fake", key="k", is_direct=True, system_prompt=None,
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
    )
    defaults = GenerationSettings(temperature=0.3, top_p=0.5, max_new_tokens=99)
    merged = effective_settings(conversation, defaults)
    assert not hasattr(conversation, "generation")  # storage keeps no second copy of the rule
    assert merged.temperature == (0.3 if temperature is None else temperature)  # 0.0 is a value, not "unset"
    assert merged.max_new_tokens == (99 if max_new_tokens is None else max_new_tokens)


# -- the layer's edges ------------------------------------------------------------------------------


def test_the_job_queue_satisfies_the_port_the_router_uses():
    from bot.jobs.queue import GenerationQueue

    for name, port_method in inspect.getmembers(JobsPort, inspect.isfunction):
        if name.startswith("_"):
            continue
        method = getattr(GenerationQueue, name)
        assert inspect.iscoroutinefunction(method), name
        wanted = [(p.name, p.kind) for p in inspect.signature(port_method).parameters.values()]
        assert [(p.name, p.kind) for p in inspect.signature(method).parameters.values()] == wanted, name


def test_rate_limit_forgets_users_whose_window_has_passed():
    now = [1000.0]
    limit = UserRateLimit(3, clock=lambda: now[0])
    for user in range(500):
        assert limit.check("fake", f"user{user}") is None
    assert len(limit) == 500
    now[0] += 61
    assert limit.check("fake", "late") is None
    assert len(limit) == 1  # the map does not grow without bound

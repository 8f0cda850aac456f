"""Commands as data: one `Command` declaration per command, and the registry that runs them.

From each declaration come `/help`'s lines, the permission check (in `CommandRegistry.run`, the
one place it is made: handlers never check), Telegram's command menu and Discord's slash tree
(the adapters read `arguments`, `variants`, `summary` and `access`). A declaration knows nothing
of any platform: an adapter with typed options turns them back into the command's text form
with `Command.text_for`, and the core parses that text like any typed command.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.conversation import messages
from bot.core.contracts import Outcome, Refusal, RefusalKind, RouteResult

if TYPE_CHECKING:
    from bot.conversation.context import CommandContext

__all__ = [
    "Access",
    "Argument",
    "Variant",
    "Command",
    "CommandRegistry",
    "Handler",
    "ParsedCommand",
    "parse_command",
]

_COMMAND_RE = re.compile(r"^/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?:\s+(.*))?$", re.DOTALL)
_NAME_RE = re.compile(r"^[a-z0-9_]{1,32}$")  # what both Telegram and Discord accept


@dataclass(frozen=True, slots=True)
class ParsedCommand:
    name: str
    args: str


def parse_command(text: str, bot_username: str | None = None) -> ParsedCommand | None:
    """`/name args` or `/name@bot args`. None if the text is not a command, or is one addressed to
    another bot. The name is lower-cased; unknown names are returned too (the registry answers them)."""
    match = _COMMAND_RE.match(text.strip())
    if not match:
        return None
    name, target, args = match.group(1).lower(), match.group(2), (match.group(3) or "").strip()
    if target and (bot_username is None or target.lower() != bot_username.lower()):
        return None
    return ParsedCommand(name, args)


class Access(str, enum.Enum):
    """Who may use a command. In a direct chat the user is the admin of their own conversation."""

    EVERYONE = "everyone"
    ADMINS = "admins"
    ADMINS_TO_CHANGE = "admins_to_change"
    """Everyone may use it without arguments (it only shows); with arguments it changes something."""


@dataclass(frozen=True, slots=True)
class Argument:
    """One typed argument, as platforms with typed options (Discord) offer it."""

    name: str
    description: str
    type: type[str] | type[int] | type[float] = str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    keyword: bool = False
    """Written `name=value` in the text form; otherwise the value itself (free text, the rest of the line)."""

    def render(self, value: object) -> str:
        return f"{self.name}={value}" if self.keyword else str(value)


@dataclass(frozen=True, slots=True)
class Variant:
    """One shape of a command with several (`/system show | set <text> | clear | default`): its text
    form is the command, then `words`, then the arguments."""

    name: str
    description: str
    words: str = ""
    arguments: tuple[Argument, ...] = ()


Handler = Callable[["CommandContext", str], Awaitable["str | RouteResult"]]
"""`handler(context, args) -> answer`: `args` is the text after the command's name. The answer is
text, or a whole `RouteResult` for more than text (a file, `RouteResult.attachment`)."""


@dataclass(frozen=True, slots=True)
class Command:
    """One command, declared once.

    `usage` follows the name in `/help` ("[new system prompt]"); `help` says what it does (the
    help line and Telegram's menu); `summary`, at most 100 characters, is the one-liner of slash
    menus (Discord), defaulting to `help`. `private`: the answer concerns its author only, so
    platforms that can show it to the author alone should.
    """

    name: str
    help: str
    handler: Handler
    access: Access = Access.EVERYONE
    usage: str = ""
    summary: str = ""
    arguments: tuple[Argument, ...] = ()
    variants: tuple[Variant, ...] = ()
    private: bool = False

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"command name {self.name!r}: 1-32 lower-case letters, digits or _")
        if not 0 < len(self.short_description) <= 100:
            raise ValueError(f"/{self.name}: the summary must be 1-100 characters")
        if self.arguments and self.variants:
            raise ValueError(f"/{self.name}: declare arguments per variant, not both")

    @property
    def help_line(self) -> str:
        return f"/{self.name}{' ' + self.usage if self.usage else ''}: {self.help}"

    @property
    def short_description(self) -> str:
        return self.summary or self.help

    def needs_admin(self, args: str) -> bool:
        return self.access is Access.ADMINS or (self.access is Access.ADMINS_TO_CHANGE and bool(args.strip()))

    def text_for(self, variant: str | None = None, values: Mapping[str, object] | None = None) -> str:
        """The text form of an invocation with typed values (None values are left out):
        `text_for("set", {"text": "Be brief."})` on /system gives "/system Be brief."."""
        arguments, words = self.arguments, ""
        if variant is not None:
            chosen = next(v for v in self.variants if v.name == variant)
            arguments, words = chosen.arguments, chosen.words
        values = values or {}
        parts = [f"/{self.name}", words]
        parts += [argument.render(values[argument.name]) for argument in arguments if values.get(argument.name) is not None]
        return " ".join(part for part in parts if part)


class CommandRegistry:
    """The commands, in the order `/help` and the menus list them."""

    def __init__(self, commands: tuple[Command, ...] = ()) -> None:
        self._commands: dict[str, Command] = {}
        for command in commands:
            self.add(command)

    def add(self, command: Command) -> Command:
        if command.name in self._commands:
            raise ValueError(f"/{command.name} is declared twice")
        self._commands[command.name] = command
        return command

    def command(self, name: str, help: str, **declaration: object) -> Callable[[Handler], Handler]:
        """Declare a command on its handler: `@registry.command("status", "…", private=True)`."""

        def declare(handler: Handler) -> Handler:
            self.add(Command(name, help, handler, **declaration))  # type: ignore[arg-type]
            return handler

        return declare

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __getitem__(self, name: str) -> Command:
        return self._commands[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._commands)

    def help_lines(self) -> list[str]:
        return [command.help_line for command in self]

    async def run(self, context: CommandContext, parsed: ParsedCommand) -> RouteResult:
        """Run a parsed command for `context.message`: the permission check, then the handler."""
        command = self._commands.get(parsed.name)
        if command is None:
            return RouteResult(Outcome.COMMAND, reply=messages.unknown_command(parsed.name))
        if command.needs_admin(parsed.args) and not context.may_administer:
            refusal = Refusal(RefusalKind.NOT_ADMIN, command=command.name)
            return RouteResult(Outcome.COMMAND, reply=messages.render_refusal(refusal), refusal=refusal, private=True)
        answer = await command.handler(dataclasses.replace(context, command=command), parsed.args)
        if isinstance(answer, RouteResult):
            return dataclasses.replace(answer, private=answer.private or command.private)
        return RouteResult(Outcome.COMMAND, reply=answer, private=command.private)

"""`parley`: the command line. Imports nothing heavy: torch lives in the worker process only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from bot.core.config import Settings, load_settings
from bot.core.errors import ParleyError
from bot.runtime.logs import Redactor, setup_logging

__all__ = ["main"]

log = logging.getLogger("parley")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley",
        description="Parley: a local Hugging Face chat model in the terminal, Discord and Telegram.",
    )
    parser.add_argument(
        "-c", "--config", metavar="PATH", help="config file (default: $PARLEY_CONFIG, else ./config.toml if present, else built-in defaults)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat = commands.add_parser(
        "chat",
        help="chat with the model in this terminal: Markdown replies, line editing, Ctrl-C stops a reply (reads piped input too)",
    )
    chat.add_argument("--conversation", metavar="NAME", help="which terminal conversation to continue (default from [console])")
    commands.add_parser("run", help="start every adapter the config enables")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="apply the database migrations (start-up does this too)")
    doctor = commands.add_parser("doctor", help="check the config, database, model and platform tokens")
    doctor.add_argument("--no-model", action="store_true", help="skip loading the model")
    audit = commands.add_parser("audit", help="the admin actions recorded (who, what, when, old and new values)")
    audit.add_argument("--conversation", metavar="KEY", help="only this conversation, as platform:key (e.g. console:default)")
    audit.add_argument("--since", metavar="DATE", help="only actions since this date (YYYY-MM-DD, or an ISO time; UTC)")
    audit.add_argument("--limit", type=int, default=100, metavar="N", help="at most N actions, newest first (default 100)")
    forget = commands.add_parser("forget-conversation", help="delete a whole conversation and everything stored for it")
    forget.add_argument("key", metavar="KEY", help="the conversation, as platform:key (e.g. telegram:-1001234)")
    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_commands.add_parser("check", help="validate the config file and print the settings in force")
    return parser


def _log_unexpected(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The one hook for exceptions nobody awaited: logged with the traceback, never swallowed."""
    exc = context.get("exception")
    log.error("unexpected error: %s", context.get("message", "(no message)"), exc_info=exc)


async def _serve(
    settings: Settings, *, console_conversation: str | None, console_only: bool, say: Callable[..., None]
) -> None:
    from adapters.console import ConsoleAdapter

    from bot.runtime.app import ParleyApp
    from bot.runtime.platforms import enabled_adapters

    asyncio.get_running_loop().set_exception_handler(_log_unexpected)
    if console_conversation:
        settings = settings.with_overrides(
            console=type(settings.console)(**{**_fields(settings.console), "conversation": console_conversation})
        )
    adapters = enabled_adapters(settings, console_only=console_only)
    console = next((a for a in adapters if isinstance(a, ConsoleAdapter)), None)
    if console is not None and settings.model.backend == "openai":
        say(f"Connecting to the model server at {settings.openai.base_url}…", file=sys.stderr)
    elif console is not None:
        say(f"Loading {settings.model.model if settings.model.model != 'embedded' else 'the embedded model (SmolLM2-135M-Instruct)'}…", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM,) + ((signal.SIGINT,) if console is None or len(adapters) > 1 else ()):
        loop.add_signal_handler(signum, stop.set)
    async with ParleyApp(settings, adapters) as app:
        if console is not None and app.client.model_info is not None:
            info = app.client.model_info
            say(f"Ready: {info.name} ({info.how()}) in {info.load_seconds:.1f} s", file=sys.stderr)
        waits = [asyncio.create_task(stop.wait())]
        if console is not None and len(adapters) == 1:
            # The terminal alone: end of input or /exit ends Parley. Beside other platforms, the
            # terminal closing (a service with no stdin) leaves them running.
            waits.append(asyncio.create_task(console.closed.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()


def _conversation_key(text: str):  # noqa: ANN202 - ConversationKey
    from bot.core.types import ConversationKey

    platform, sep, key = text.partition(":")
    if not sep or not platform or not key:
        raise ParleyError(f"a conversation is written platform:key (e.g. console:default), not {text!r}")
    return ConversationKey(platform, key)


def _since(text: str | None):  # noqa: ANN202 - datetime | None
    from datetime import datetime, timezone

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ParleyError(f"--since {text!r}: give a date as YYYY-MM-DD or an ISO time") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


async def _audit(settings: Settings, args: argparse.Namespace, say: Callable[..., None]) -> int:
    from bot.conversation import messages
    from storage import Database, Repository

    key = _conversation_key(args.conversation) if args.conversation else None
    since = _since(args.since)
    database = Database(settings.database_url())
    await database.start()
    try:
        repo = Repository(database.sessions)
        conversation_id = None
        if key is not None:
            conversation = await repo.find_conversation(key)
            if conversation is None:
                say(f"no conversation {key.platform}:{key.key} is stored")
                return 1
            conversation_id = conversation.id
        rows = await repo.recent_audit(conversation_id, limit=args.limit, since=since)
    finally:
        await database.stop()
    if not rows:
        say("no admin actions recorded" + (" since then" if since else ""))
    for entry, conversation in rows:
        where = "" if key is not None else f"{conversation.platform}:{conversation.key}"
        say(messages.audit_line(entry.created_at, entry.actor_name, entry.action, entry.detail, entry.old_value, entry.new_value, where))
    return 0


async def _forget_conversation(settings: Settings, text: str, say: Callable[..., None]) -> int:
    from storage import Database, Repository

    key = _conversation_key(text)
    database = Database(settings.database_url())
    await database.start()
    try:
        deleted = await Repository(database.sessions).delete_conversation(key)
    finally:
        await database.stop()
    if deleted is None:
        say(f"no conversation {key.platform}:{key.key} is stored; nothing deleted")
        return 1
    say(
        f"deleted {key.platform}:{key.key}: {deleted.messages} messages, {deleted.jobs} jobs, "
        f"{deleted.audit_entries} audit entries"
    )
    return 0


def _fields(obj: object) -> dict:
    from dataclasses import fields

    return {f.name: getattr(obj, f.name) for f in fields(obj)}  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        settings = load_settings(args.config)
    except ParleyError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings, quiet=args.command in ("chat", "doctor", "audit", "forget-conversation"), verbose=args.verbose)
    redact = Redactor(settings.secret_values())

    def say(text: str, file: TextIO = sys.stdout) -> None:
        """Every line the command line prints goes through the same scrubbing as the logs."""
        print(redact(text), file=file, flush=True)

    try:
        if args.command == "db":
            from storage import upgrade_database

            revision = upgrade_database(settings.database_url())
            say(f"database is at revision {revision}")
            return 0
        if args.command == "doctor":
            from bot.runtime.doctor import run_doctor

            return 1 if asyncio.run(run_doctor(settings, model=not args.no_model, out=say)) else 0
        if args.command == "audit":
            return asyncio.run(_audit(settings, args, say))
        if args.command == "forget-conversation":
            return asyncio.run(_forget_conversation(settings, args.key, say))
        if args.command == "config":
            say(f"settings from {settings.source}, all valid:")
            for section in ("bot", "model", "generation", "worker", "queue", "storage", "console", "openai", "telegram", "discord", "metrics"):
                say(f"[{section}]")
                for key, value in _fields(getattr(settings, section)).items():
                    say(f"  {key} = {value!r}")
            return 0
        asyncio.run(
            _serve(
                settings,
                console_conversation=getattr(args, "conversation", None),
                console_only=args.command == "chat",
                say=say,
            )
        )
        return 0
    except ParleyError as exc:
        say(f"parley: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

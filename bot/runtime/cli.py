"""`parley`: the command line. Imports nothing heavy: torch lives in the worker process only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from bot.core.config import Settings, load_settings
from bot.core.errors import ParleyError
from bot.runtime.logs import setup_logging

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
    chat = commands.add_parser("chat", help="chat with the model in this terminal (reads piped input too)")
    chat.add_argument("--conversation", metavar="NAME", help="which terminal conversation to continue (default from [console])")
    commands.add_parser("run", help="start every adapter the config enables")
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="apply the database migrations (start-up does this too)")
    doctor = commands.add_parser("doctor", help="check the config, database, model and platform tokens")
    doctor.add_argument("--no-model", action="store_true", help="skip loading the model")
    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_commands.add_parser("check", help="validate the config file and print the settings in force")
    return parser


def _log_unexpected(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The one hook for exceptions nobody awaited: logged with the traceback, never swallowed."""
    exc = context.get("exception")
    log.error("unexpected error: %s", context.get("message", "(no message)"), exc_info=exc)


async def _serve(settings: Settings, *, console_conversation: str | None, console_only: bool) -> None:
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
        print(f"Connecting to the model server at {settings.openai.base_url}…", file=sys.stderr, flush=True)
    elif console is not None:
        print(f"Loading {settings.model.model if settings.model.model != 'embedded' else 'the embedded model (SmolLM2-135M-Instruct)'}…", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM,) + ((signal.SIGINT,) if console is None or len(adapters) > 1 else ()):
        loop.add_signal_handler(signum, stop.set)
    async with ParleyApp(settings, adapters) as app:
        if console is not None and app.client.model_info is not None:
            info = app.client.model_info
            print(f"Ready: {info.name} ({info.how()}) in {info.load_seconds:.1f} s", file=sys.stderr, flush=True)
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
    setup_logging(settings, quiet=args.command in ("chat", "doctor"), verbose=args.verbose)
    try:
        if args.command == "db":
            from storage import upgrade_database

            revision = upgrade_database(settings.database_url())
            print(f"database is at revision {revision}")
            return 0
        if args.command == "doctor":
            from bot.runtime.doctor import run_doctor

            return 1 if asyncio.run(run_doctor(settings, model=not args.no_model)) else 0
        if args.command == "config":
            print(f"settings from {settings.source}, all valid:")
            for section in ("bot", "model", "generation", "worker", "queue", "storage", "console"):
                print(f"[{section}]")
                for key, value in _fields(getattr(settings, section)).items():
                    print(f"  {key} = {value!r}")
            return 0
        asyncio.run(
            _serve(
                settings,
                console_conversation=getattr(args, "conversation", None),
                console_only=args.command == "chat",
            )
        )
        return 0
    except ParleyError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

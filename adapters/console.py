"""The terminal: `parley chat`. Lines from standard input become messages of one direct
conversation; replies stream to standard output as they are generated. Works on a TTY and on
piped input alike (it answers each line before reading the next, and ends at end of input)."""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot.core.config import default_data_dir
from bot.core.contracts import Attachment, Outcome
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Adapter, Core, ReplyStream

if TYPE_CHECKING:
    from bot.core.config import Settings

__all__ = ["ConsoleAdapter"]

EXIT_COMMANDS = {"/exit", "/quit"}


class _ConsoleStream(ReplyStream):
    def __init__(self, out: TextIO, speaker: str) -> None:
        self.out = out
        self.speaker = speaker
        self.shown = ""
        self.started = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def update(self, text: str) -> None:
        if not self.started:
            self._write(f"{self.speaker}: ")
            self.started = True
        settled = self.shown.rstrip()  # trailing spaces shown mid-stream may be trimmed at the end
        if text.startswith(self.shown):
            self._write(text[len(self.shown) :])
        elif text.startswith(settled):
            self._write(text[len(settled) :])
        else:
            # A retry after the worker restarted produced different text: start the reply over.
            self._write(f"\n[the model restarted; answering again]\n{self.speaker}: {text}")
        self.shown = text

    async def finish(self, text: str) -> list[str]:
        await self.update(text)
        self._write("\n")
        return []

    async def fail(self, notice: str) -> None:
        self._write(("\n" if self.started else "") + f"{self.speaker}: {notice}\n")


class ConsoleAdapter(Adapter):
    """One terminal user talking to the bot in one direct conversation."""

    platform = "console"
    max_message_length = 1_000_000
    edit_interval = 0.0

    def __init__(
        self,
        *,
        conversation: str = "default",
        user_name: str | None = None,
        bot_name: str = "Parley",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        export_dir: str | Path | None = None,
    ) -> None:
        self.conversation = ConversationKey(self.platform, conversation)
        self.export_dir = Path(export_dir) if export_dir is not None else default_data_dir() / "exports"
        """Where files the bot answers with (/export) are written; their path is printed."""
        self.user_name = user_name or _login_name()
        self.bot_name = bot_name
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty() and self.stdout.isatty()
        self.closed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()

    @classmethod
    def from_config(cls, settings: Settings) -> ConsoleAdapter:
        return cls(
            conversation=settings.console.conversation,
            user_name=settings.console.user_name or None,
            bot_name=settings.bot.name,
        )

    async def start(self, core: Core) -> None:
        loop = asyncio.get_running_loop()
        # A daemon thread, not the default executor: a read blocked on the terminal must not
        # keep the process alive after /exit or Ctrl-C.
        threading.Thread(target=self._read_lines, args=(loop,), name="parley-stdin", daemon=True).start()
        self._task = asyncio.create_task(self._converse(core), name="parley-console")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.closed.set()

    async def open_reply(
        self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()
    ) -> ReplyStream:
        # A terminal cannot edit what an earlier process printed: the reply is printed whole.
        return _ConsoleStream(self.stdout, self.bot_name)

    def _read_lines(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for line in self.stdin:
                loop.call_soon_threadsafe(self._lines.put_nowait, line)
        except (OSError, ValueError):
            pass  # stdin closed under us: treat as end of input
        finally:
            try:
                loop.call_soon_threadsafe(self._lines.put_nowait, None)
            except RuntimeError:
                pass  # the loop is already closed

    def _print(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    async def _converse(self, core: Core) -> None:
        if self.interactive:
            self._print(f"Chatting with {self.bot_name}. /help lists the commands, /exit quits.\n")
        try:
            while True:
                if self.interactive:
                    self._print("you> ")
                line = await self._lines.get()
                if line is None:
                    if self.interactive:
                        self._print("\n")
                    break
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                if text.strip().lower() in EXIT_COMMANDS:
                    break
                result = await core.handle(self._incoming(text))
                if result.reply:
                    self._print(f"{result.reply}\n")
                if result.attachment is not None:
                    self._print(f"{self._save(result.attachment)}\n")
                if result.outcome is Outcome.QUEUED and result.job_id is not None:
                    await core.wait_for(result.job_id)
        finally:
            self.closed.set()

    def _save(self, attachment: Attachment) -> Path:
        """Write a file the bot answered with into `export_dir` (readable by this user only)."""
        self.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.export_dir / Path(attachment.filename).name
        path.write_bytes(attachment.data)
        path.chmod(0o600)
        return path

    def _incoming(self, text: str) -> IncomingMessage:
        return IncomingMessage(
            conversation=self.conversation,
            message_id=uuid.uuid4().hex,
            author=Author(id=self.user_name, name=self.user_name, is_admin=True),
            text=text,
            is_direct=True,
            addressed=True,
        )


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "you"

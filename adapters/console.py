"""The terminal: `parley chat`. Lines become messages of one direct conversation; replies stream to
standard output as they are generated.

On a terminal, replies are rendered as Markdown (`console_render`) and input has line editing,
a history kept across runs and several lines to a message (`console_input`); Ctrl-C stops a
reply, `/retry` answers the last question again and `/continue` goes on with a reply cut at the
length limit. Piped, it reads a line, answers it, reads the next, prints plain text and ends at end
of input."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from bot.core.config import default_data_dir
from bot.core.contracts import Attachment, Control, ControlPress, Outcome
from bot.core.types import Author, ConversationKey, IncomingMessage

from .base import Adapter, Core, ReplyStream
from .console_render import new_part

if TYPE_CHECKING:
    from rich.console import Console

    from bot.core.config import Settings

    from .console_input import LineReader

__all__ = ["ConsoleAdapter"]

log = logging.getLogger("parley.adapters.console")

EXIT_COMMANDS = {"/exit", "/quit"}
ALIASES = {"exit": "/exit", "quit": "/exit", "clear": "/reset", "help": "/help"}
"""Bare words taken as commands when they are the whole input (nobody asks a model just that)."""
RETRY = "/retry"
CONTINUE = "/continue"
LEAVE_GRACE = 5.0
"""Seconds leaving waits for a stopped reply to be stored as stopped."""

BANNER = "Chatting with {name}. /help lists the commands; Ctrl-C stops a reply; Ctrl-D quits.\n"
TERMINAL_HELP = """
In this terminal:
  /retry        answer the last question again, replacing the last reply
  /continue     go on with a reply cut at the length limit, from where it stopped
  Ctrl-C        stop a reply (kept, marked stopped); at an empty prompt, twice leaves
  /exit, Ctrl-D leave (exit works too; so does the end of piped input)
  clear, help   the same as /reset and /help
  Esc Enter     a new line in the same message; so does \\ at the end of a line,
                and pasted lines stay one message
"""
HISTORY_HELP = "  Up, Down      earlier messages (kept in {path})\n"
CUT_NOTICE = "(reply cut at the length limit: /continue to go on)"
LEAVE_HINT = "(Ctrl-C again, Ctrl-D or /exit leaves)"
NOTHING_TO_RETRY = "(no reply to answer again yet in this session)"
NOTHING_TO_CONTINUE = "(no reply to continue yet in this session)"
STOP_FAILED = "(the reply could not be stopped; see the log)"


class _ConsoleStream(ReplyStream):
    """A reply as plain text (piped output). `before`: the text a continuation goes on from,
    already printed: only what follows it is printed."""

    def __init__(self, out: TextIO, speaker: str, *, before: str = "") -> None:
        self.out = out
        self.speaker = speaker
        self.before = before
        self.text = ""
        self.shown = ""
        self.started = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def update(self, text: str) -> None:
        self.text = text
        if self.before:
            added = new_part(text, self.before)
            if not added.strip():
                return
            text = "…" + added
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
        if self.started:
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
        history_file: str | Path | None = None,
    ) -> None:
        self.conversation = ConversationKey(self.platform, conversation)
        self.export_dir = Path(export_dir) if export_dir is not None else default_data_dir() / "exports"
        """Where files the bot answers with (/export) are written; their path is printed."""
        self.history_file = Path(history_file) if history_file is not None else default_data_dir() / "chat_history"
        """What was typed at the prompt, kept across runs (on a terminal only)."""
        self.user_name = user_name or _login_name()
        self.bot_name = bot_name
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = _isatty(self.stdin) and _isatty(self.stdout)
        """A person at a terminal: a prompt with line editing, Ctrl-C stops replies."""
        self.markdown = _isatty(self.stdout)
        """Replies rendered as Markdown (standard output is a terminal); plain text when piped."""
        self.closed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader: LineReader | None = None
        self._console: Console | None = None
        self._core: Core | None = None
        self._leave = asyncio.Event()
        self._last_job: int | None = None  # the reply /retry and /continue act on
        self._last_stream: ReplyStream | None = None
        self._continuing: str | None = None  # the text a /continue goes on from, until its reply opens
        self._running_job: int | None = None
        self._interrupted = False  # Ctrl-C since the input was read
        self._stopping: asyncio.Task | None = None
        self._notices: list[str] = []  # said while a reply streamed: printed after it

    @classmethod
    def from_config(cls, settings: Settings) -> ConsoleAdapter:
        return cls(
            conversation=settings.console.conversation,
            user_name=settings.console.user_name or None,
            bot_name=settings.bot.name,
        )

    async def start(self, core: Core) -> None:
        self._core = core
        if self.interactive:
            from .console_input import LineReader

            self._reader = LineReader(self.history_file)
        else:
            loop = asyncio.get_running_loop()
            # A daemon thread, not the default executor: a read blocked on the terminal must not
            # keep the process alive after /exit or Ctrl-C.
            threading.Thread(target=self._read_lines, args=(loop,), name="parley-stdin", daemon=True).start()
        self._task = asyncio.create_task(self._converse(core), name="parley-console")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        close = getattr(self._last_stream, "close", None)
        if close is not None:
            close()
        self.closed.set()

    async def open_reply(
        self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()
    ) -> ReplyStream:
        # A terminal cannot edit what an earlier process printed: the reply is printed whole.
        before, self._continuing = self._continuing or "", None
        stream: ReplyStream
        if self._reader is not None and self._reader.reading:
            from .console_input import AsideStream

            return AsideStream(self._show_aside)
        if self.markdown:
            from .console_render import MarkdownStream

            stream = MarkdownStream(self._rich(), self.bot_name, before=before)
        else:
            stream = _ConsoleStream(self.stdout, self.bot_name, before=before)
        self._last_stream = stream
        return stream

    def _show_aside(self, text: str) -> None:
        if self.markdown:
            from .console_render import show_reply

            show_reply(self._rich(), self.bot_name, text)
        else:
            self._print(f"{self.bot_name}: {text}\n")

    def _rich(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stdout, highlight=False)
        return self._console

    # -- input -------------------------------------------------------------------------------------

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

    async def _next_input(self) -> str | None:
        """The next message typed or piped; None to leave."""
        if self._reader is None:
            line = await self._lines.get()
            return None if line is None else line.rstrip("\r\n")
        hinted = False
        while True:
            try:
                return await self._reader.read()
            except EOFError:
                return None
            except KeyboardInterrupt:
                if hinted:
                    return None
                hinted = True
                self._print(f"{LEAVE_HINT}\n")

    def _print(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    # -- the conversation --------------------------------------------------------------------------

    async def _converse(self, core: Core) -> None:
        if self.interactive:
            self._print(BANNER.format(name=self.bot_name))
        try:
            while not self._leave.is_set():
                text = await self._next_input()
                if text is None:
                    break
                if not text.strip():
                    continue
                word = text.strip().lower()
                command = ALIASES.get(word, word)
                if command in EXIT_COMMANDS:
                    break
                async with self._busy():
                    if command in (RETRY, CONTINUE):
                        await self._press(core, Control.REGENERATE if command == RETRY else Control.CONTINUE)
                    else:
                        await self._send(core, command if word in ALIASES else text, help_asked=command == "/help")
        finally:
            self.closed.set()

    async def _send(self, core: Core, text: str, *, help_asked: bool) -> None:
        result = await core.handle(self._incoming(text))
        if result.reply:
            self._print(f"{result.reply}\n")
        if help_asked:
            self._print(TERMINAL_HELP + (HISTORY_HELP.format(path=self.history_file) if self.interactive else ""))
        if result.attachment is not None:
            self._print(f"{self._save(result.attachment)}\n")
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            self._last_job = result.job_id
            await self._wait(core, result.job_id)

    async def _press(self, core: Core, control: Control) -> None:
        """/retry or /continue, on the last reply of this session."""
        if self._last_job is None:
            self._print((NOTHING_TO_RETRY if control is Control.REGENERATE else NOTHING_TO_CONTINUE) + "\n")
            return
        if control is Control.CONTINUE:
            self._continuing = getattr(self._last_stream, "text", "") or ""
        result = await core.press(self._control(self._last_job, control))
        if result.outcome is Outcome.QUEUED and result.job_id is not None:
            self._last_job = result.job_id
            try:
                await self._wait(core, result.job_id)
            finally:
                self._continuing = None
            return
        self._continuing = None
        if result.reply:
            self._print(f"{result.reply}\n")

    async def _wait(self, core: Core, job_id: int) -> None:
        """Until the job's reply has been shown, or Ctrl-C twice (the reply is stopped first)."""
        self._running_job = job_id
        if self._interrupted:
            self._stop(job_id)
        done = asyncio.ensure_future(core.wait_for(job_id))
        leave = asyncio.ensure_future(self._leave.wait())
        try:
            await asyncio.wait({done, leave}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                # Leaving mid-reply: it ends stopped and stored so, not answered again at the next start.
                self._stop(job_id)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(done), LEAVE_GRACE)
        finally:
            self._running_job = None
            for task in (done, leave):
                task.cancel()
            if self._stopping is not None:
                [outcome] = await asyncio.gather(self._stopping, return_exceptions=True)
                self._stopping = None
                if isinstance(outcome, Exception):
                    log.error("job %d: Ctrl-C could not stop the reply", job_id, exc_info=outcome)
                    self._notices.append(STOP_FAILED)
        stream = self._last_stream
        shown = stream is not None and stream.job_id in (job_id, None) and getattr(stream, "started", False)
        if shown and self.interactive and Control.CONTINUE in stream.controls:  # piped output stays the reply alone
            self._notices.append(CUT_NOTICE)
        for notice in self._notices:
            self._print(f"{notice}\n")
        self._notices.clear()
        if shown and self.markdown:
            self._print("\n")  # a blank line between a rendered reply and the next prompt

    def _stop(self, job_id: int) -> None:
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.ensure_future(self._press_stop(job_id))

    async def _press_stop(self, job_id: int) -> None:
        assert self._core is not None
        result = await self._core.press(self._control(job_id, Control.STOP))
        if result.outcome not in (Outcome.COMMAND, Outcome.DUPLICATE) and result.reply:
            self._notices.append(result.reply)

    def _on_interrupt(self) -> None:
        """Ctrl-C while a reply streams (or a command runs): stop it; a second one leaves."""
        from .console_input import discard_typed_keys

        discard_typed_keys(self.stdin)
        if self._interrupted:
            self._leave.set()
            return
        self._interrupted = True
        if self._running_job is not None:
            self._stop(self._running_job)

    @contextlib.asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        """From a message read to the next prompt: keys typed are held back (not printed into the
        reply) and Ctrl-C stops the reply instead of ending Parley."""
        self._interrupted = False
        if not self.interactive:
            yield
            return
        from .console_input import keys_held_back

        loop = asyncio.get_running_loop()
        with keys_held_back(self.stdin):
            try:
                loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
            except (NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, a thread)
                installed = False
            else:
                installed = True
            try:
                yield
            finally:
                if installed:
                    loop.remove_signal_handler(signal.SIGINT)
                if self._leave.is_set():
                    self._print("\n")

    def _control(self, job_id: int, control: Control) -> ControlPress:
        return ControlPress(self.conversation, job_id, control, self._author(), is_direct=True)

    def _save(self, attachment: Attachment) -> Path:
        """Write a file the bot answered with into `export_dir` (readable by this user only)."""
        self.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.export_dir / Path(attachment.filename).name
        path.write_bytes(attachment.data)
        path.chmod(0o600)
        return path

    def _author(self) -> Author:
        return Author(id=self.user_name, name=self.user_name, is_admin=True)

    def _incoming(self, text: str) -> IncomingMessage:
        return IncomingMessage(
            conversation=self.conversation,
            message_id=uuid.uuid4().hex,
            author=self._author(),
            text=text,
            is_direct=True,
            addressed=True,
        )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "you"

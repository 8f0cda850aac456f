"""Input in a terminal: a prompt with line editing and a history kept across runs
(prompt_toolkit), several lines in one message, and keys held back while a reply streams.

Between replies prompt_toolkit owns the keyboard. While a reply streams the terminal neither
echoes nor edits lines (`keys_held_back`), so nothing typed lands in the reply: what is typed waits
in the terminal's input queue and appears at the next prompt. Ctrl-C still sends SIGINT then."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

try:
    import termios
except ImportError:  # not a POSIX terminal (Windows): keys are not held back there
    termios = None  # type: ignore[assignment]

from .base import ReplyStream

__all__ = ["LineReader", "AsideStream", "keys_held_back", "discard_typed_keys", "PROMPT"]

PROMPT = "you> "
CONTINUATION = "...  "


def _history(path: Path | None) -> History:
    """The history file (readable by this user only), or one in memory when it cannot be written."""
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


def _bindings() -> KeyBindings:
    keys = KeyBindings()

    @Condition
    def at_end_after_backslash() -> bool:
        from prompt_toolkit.application.current import get_app

        buffer = get_app().current_buffer
        return buffer.text.endswith("\\") and buffer.cursor_position == len(buffer.text)

    @keys.add("escape", "enter")
    def _new_line(event: KeyPressEvent) -> None:
        """Esc then Enter (or Alt+Enter): a new line in the same message."""
        event.current_buffer.insert_text("\n")

    @keys.add("enter", filter=at_end_after_backslash)
    def _continue_line(event: KeyPressEvent) -> None:
        """A line ending in a backslash goes on on the next line (the backslash is dropped)."""
        event.current_buffer.delete_before_cursor(1)
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        """Ctrl-C clears what is typed; on an empty line it interrupts (the caller hints or leaves)."""
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return keys


class LineReader:
    """The prompt of the terminal chat. `read` returns one message (maybe several lines); it
    raises EOFError on Ctrl-D at an empty line and KeyboardInterrupt on Ctrl-C at an empty line."""

    def __init__(self, history_file: Path | None) -> None:
        self.session: PromptSession[str] = PromptSession(
            history=_history(history_file),
            key_bindings=_bindings(),
            multiline=False,
            prompt_continuation=CONTINUATION,
            enable_open_in_editor=False,
        )

        self.reading = False
        """The prompt is on the screen (a reply that opens now is shown above it, whole)."""

    async def read(self) -> str:
        self.reading = True
        try:
            return await self.session.prompt_async(PROMPT)
        finally:
            self.reading = False


class AsideStream(ReplyStream):
    """A reply that began while the prompt waits for input (one the previous run left unfinished):
    shown whole when it ends, above the prompt, so it never mixes with what is being typed."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self.show = show
        self.text = ""

    async def update(self, text: str) -> None:
        self.text = text

    async def finish(self, text: str) -> list[str]:
        self.text = text
        await run_in_terminal(lambda: self.show(text))
        return []

    async def fail(self, notice: str) -> None:
        await run_in_terminal(lambda: self.show(f"{self.text}\n\n{notice}" if self.text else notice))


def _fileno(stream: object) -> int | None:
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    return fd if os.isatty(fd) else None


@contextlib.contextmanager
def keys_held_back(stdin: object) -> Iterator[None]:
    """While a reply streams: the terminal neither echoes keys nor edits lines, so nothing typed
    is printed into the reply; keys wait in its input queue for the next prompt. Ctrl-C still
    sends SIGINT, and it does not flush what is being written (NOFLSH)."""
    fd = _fileno(stdin)
    if termios is None or fd is None:
        yield
        return
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    quiet = list(saved)
    quiet[3] = (quiet[3] & ~(termios.ECHO | termios.ICANON)) | termios.ISIG | termios.NOFLSH
    quiet[6] = list(saved[6])
    quiet[6][termios.VMIN] = 1
    quiet[6][termios.VTIME] = 0
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW: keys typed so far are kept
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def discard_typed_keys(stdin: object) -> None:
    """Forget keys typed ahead (after Ctrl-C stopped a reply, as a shell does)."""
    fd = _fileno(stdin)
    if termios is not None and fd is not None:
        with contextlib.suppress(termios.error):
            termios.tcflush(fd, termios.TCIFLUSH)

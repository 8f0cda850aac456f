"""Replies in a terminal, rendered as Markdown while they stream (rich): headings, emphasis, lists,
and code blocks highlighted. Only the newest part of a reply stays live (redrawn in place); what
is settled is printed above it for good, so a reply taller than the screen never makes the live
area redraw what has scrolled away."""

from __future__ import annotations

import os
import re
import time

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from .base import ReplyStream

__all__ = ["MarkdownStream", "show_reply", "terminal_markdown", "open_fence", "settle", "new_part"]

REFRESH_SECONDS = 0.1
"""At most this often the live area is redrawn (the final text is always drawn)."""
CODE_THEME = "monokai"
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_BARE_TAG = re.compile(r"<(/?)(\w*)>")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


class _Reply:
    """A reply's Markdown as rendered here: see `terminal_markdown`; and no blank line above a
    list that opens it (rich puts one there)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.markdown = Markdown(terminal_markdown(text), code_theme=CODE_THEME)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.markdown, options, pad=False, new_lines=False)
        if lines and _LIST_ITEM.match(self.text.lstrip("\n")) and not "".join(s.text for s in lines[0]).strip():
            lines = lines[1:]
        for line in lines:
            yield from line
            yield Segment.line()


def _fence_of(line: str) -> str | None:
    match = _FENCE.match(line)
    return match.group(1) if match else None


def terminal_markdown(text: str) -> str:
    """Model text as Markdown shows it as meant in a terminal: a single line break stays a line
    break (Markdown would join the lines), and a bare tag such as `<think>` is shown, not dropped
    as HTML. Code blocks are left as they are."""
    out: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        marker = _fence_of(line)
        if fence is not None:
            if marker is not None and marker[0] == fence[0] and len(marker) >= len(fence) and not line.strip()[len(marker):]:
                fence = None
            out.append(line)
        elif marker is not None:
            fence = marker
            out.append(line)
        elif line.strip():
            out.append(_BARE_TAG.sub(r"\<\1\2\>", line) + "  ")
        else:
            out.append(line)
    return "\n".join(out)


def open_fence(text: str) -> str | None:
    """The opening line of a code block `text` leaves open at its end, or None."""
    fence: str | None = None
    opening = ""
    for line in text.split("\n"):
        marker = _fence_of(line)
        if fence is None and marker is not None:
            fence, opening = marker, line.strip()
        elif fence is not None and marker is not None and marker[0] == fence[0] and len(marker) >= len(fence):
            if not line.strip()[len(marker):]:
                fence = None
    return opening if fence is not None else None


def settle(text: str) -> tuple[str, int, str, bool]:
    """Split a reply's Markdown into a settled head, printed for good, and the tail still growing:
    at the last blank line outside a code block; failing that, inside a code block at its last
    line (the block is closed in the head and reopened in the tail); failing that, at the last
    line break. Returns (head, cut, reopen, gap): the tail is `reopen + text[cut:]`, and `gap`
    says a blank line belongs between them. The head is empty when there is nowhere to cut."""
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    fence: str | None = None
    opening = ""
    blank_cut = -1  # the last blank line outside code with more text after it
    code_cut = -1  # the last line inside a code block still open at the end
    for index, line in enumerate(lines[:-1]):
        marker = _fence_of(line)
        if fence is None:
            if marker is not None:
                fence, opening, code_cut = marker, line.strip(), -1
            elif not line.strip() and index > 0:
                blank_cut = index
        elif marker is not None and marker[0] == fence[0] and len(marker) >= len(fence) and not line.strip()[len(marker) :]:
            fence = None
        else:
            code_cut = index
    if fence is not None and code_cut > 0:
        head = "\n".join(lines[: code_cut + 1]) + "\n" + fence
        return head, starts[code_cut + 1], opening + "\n", False
    if blank_cut > 0:
        return "\n".join(lines[:blank_cut]).rstrip("\n"), starts[blank_cut + 1], "", True
    if fence is None and len(lines) > 1 and lines[-1].strip():
        return "\n".join(lines[:-1]), starts[len(lines) - 1], "", False
    if fence is None:
        # One long paragraph: at its last sentence end, else its last space.
        last = lines[-1]
        at = max(last.rfind(". "), last.rfind("? "), last.rfind("! "))
        at = at + 1 if at > 0 else last.rfind(" ")
        if at > 0:
            return "\n".join([*lines[:-1], last[:at]]), starts[len(lines) - 1] + at + 1, "", False
    return "", 0, "", False


def show_reply(console: Console, speaker: str, text: str) -> None:
    """A whole reply, rendered at once."""
    console.print(Text(f"{speaker}:", style="bold cyan"))
    console.print(_Reply(text))


def new_part(text: str, before: str) -> str:
    """What `text` adds to `before`, the text already shown (a continuation is given the whole
    reply; whitespace at the cut may differ)."""
    if text.startswith(before):
        return text[len(before) :]
    common = len(os.path.commonprefix([text, before]))
    if common >= len(before.rstrip()):
        return text[common:]
    return text[len(before.rstrip()) :] if text.startswith(before.rstrip()) else text


class MarkdownStream(ReplyStream):
    """One reply shown in a terminal as live-updating Markdown (rich `Live`). `before` is the text
    a continuation goes on from: it is on the screen already, so only what follows it is shown
    (a code block left open there is reopened, so the rest is still highlighted)."""

    def __init__(self, console: Console, speaker: str, *, before: str = "") -> None:
        self.console = console
        self.speaker = speaker
        self.before = before
        self.text = ""
        """The whole reply so far, as the queue gave it."""
        self.live: Live | None = None
        self._reopen = (open_fence(before) or "") if before else ""
        self._committed = 0  # characters of the Markdown source printed above the live area
        self._reopened = ""  # a code block split there, reopened at the top of the live area
        self._last_draw = 0.0
        self.started = False
        """Something of this reply is on the screen."""

    def _source(self) -> str:
        if not self.before:
            return self.text
        added = new_part(self.text, self.before)
        return (self._reopen + "\n" + added.lstrip("\n")) if self._reopen else "…" + added

    def _start(self) -> None:
        self.started = True
        label = f"{self.speaker} (continued):" if self.before else f"{self.speaker}:"
        self.console.print(Text(label, style="bold cyan"))
        self.live = Live(
            console=self.console,
            auto_refresh=False,  # drawn from update(): no thread writing to the terminal
            vertical_overflow="visible",
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def _draw(self) -> None:
        assert self.live is not None
        source = self._source()
        self._settle_tall(source)
        tail = self._reopened + source[self._committed :]
        self.live.update(_Reply(tail), refresh=True)
        self._last_draw = time.monotonic()

    def _settle_tall(self, source: str) -> None:
        """While the live part is taller than the screen, print its settled head above it."""
        assert self.live is not None
        room = max(self.console.size.height - 3, 4)
        while self._height(tail := self._reopened + source[self._committed :]) > room:
            head, cut, reopen, gap = settle(tail)
            if not head or cut < len(self._reopened):
                return
            self.live.update(Text(""), refresh=False)
            self.console.print(_Reply(head))
            if gap:
                self.console.print()
            self._committed += cut - len(self._reopened)
            self._reopened = reopen

    def _height(self, markdown: str) -> int:
        lines = self.console.render_lines(_Reply(markdown), pad=False)
        return len(lines)

    async def update(self, text: str) -> None:
        self.text = text
        if self.before and not new_part(text, self.before).strip():
            return
        if self.live is None:
            self._start()
        if time.monotonic() - self._last_draw >= REFRESH_SECONDS:
            self._draw()

    async def finish(self, text: str) -> list[str]:
        self.text = text
        if self.live is None:
            self._start()
        self._draw()
        self._end()
        return []

    async def fail(self, notice: str) -> None:
        if self.live is None:
            self.started = True
            self.console.print(Text(f"{self.speaker}:", style="bold cyan"))
        else:
            self._draw()
            self._end()
        self.console.print(Text(notice, style="bold red"))

    def _end(self) -> None:
        if self.live is not None:
            self.live.stop()

    def close(self) -> None:
        """Leave the terminal usable if the program ends while this reply streams."""
        if self.live is not None and self.live.is_started:
            self.live.stop()

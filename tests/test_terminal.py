"""`parley chat` as a person uses it: the real command in a real pseudo-terminal (pexpect).

The model is a small scripted OpenAI-compatible server of our own on 127.0.0.1 (aiohttp on a
thread, streaming SSE chat completions; `[model] backend = "openai"`), so replies are known
Markdown, slow enough to interrupt, or cut at the length limit. Everything between it and the
terminal is Parley's real code: the CLI, the app, storage, the queue, the console adapter."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")
from aiohttp import web  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARLEY = [sys.executable, "-m", "bot.runtime.cli"]
ANSI = re.compile(r"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][A-Za-z0-9]|[=>78NOM])")
# A fresh prompt: prompt_toolkit turns bracketed paste on, then draws "you>" (the space is a move).
PROMPT = re.compile(r"\x1b\[\?2004h(?:\x1b\[[0-9;?]*[A-Za-z])*you>")

MARKDOWN_REPLY = "Here is **bold** text and `code`.\n\n```python\nprint('hi')\n```\n"
CUT_REPLY = "alpha beta gamma"
CONTINUATION = " delta epsilon."


class ScriptedModel:
    """`/v1/models` and streaming `/v1/chat/completions`, answering by the last user message:
    "markdown" → `MARKDOWN_REPLY`; "slow" → sixty words, a tenth of a second apart; "cut" →
    `CUT_REPLY` ended by the length limit (a continuation of it gets `CONTINUATION`); "count" →
    "answer number N", N counting requests; anything else → "echo: " + the message."""

    def __init__(self) -> None:
        self.requests: list[list[dict]] = []
        self.counts: dict[str, int] = defaultdict(int)
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scripted-model", daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> ScriptedModel:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "scripted", "object": "model", "max_model_len": 8192}]})

    def _script(self, messages: list[dict]) -> tuple[list[str], float, str]:
        last = messages[-1]
        if last["role"] == "assistant":  # a continuation: the reply so far comes last
            return [CONTINUATION], 0.05, "stop"
        prompt = last["content"]
        if "markdown" in prompt:
            return re.findall(r"\S+\s*|\s+", MARKDOWN_REPLY), 0.02, "stop"
        if "slow" in prompt:
            return [f"word{i} " for i in range(60)], 0.1, "stop"
        if "cut" in prompt:
            return re.findall(r"\S+\s*", CUT_REPLY), 0.05, "length"
        if "count" in prompt:
            self.counts[prompt] += 1
            return [f"answer number {self.counts[prompt]}"], 0.05, "stop"
        return ["echo: ", prompt], 0.05, "stop"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body["messages"])
        pieces, delay, finish = self._script(body["messages"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await asyncio.sleep(delay)
            await response.write(_chunk({"content": piece}, None))
        await response.write(_chunk({}, finish) + b"data: [DONE]\n\n")
        return response


def _chunk(delta: dict, finish: str | None) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "scripted",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n".encode()


@pytest.fixture
def model():
    with ScriptedModel() as server:
        yield server


@pytest.fixture
def config(model, tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        "\n".join([
            "[model]",
            'backend = "openai"',
            "[openai]",
            f"base_url = {json.dumps(model.base_url)}",
            "max_retries = 0",
            "[storage]",
            "url = " + json.dumps(f"sqlite+aiosqlite:///{tmp_path / 'parley.db'}"),
            "[generation]",
            "max_new_tokens = 64",
        ]) + "\n"
    )
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TERM": "xterm-256color",
        "XDG_DATA_HOME": str(tmp_path / "data"),
        # pexpect answers no cursor-position request; a real terminal does.
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


class Terminal:
    """`parley chat` in a pseudo-terminal, with what it printed kept (escape codes removed)."""

    def __init__(self, config: Path, tmp_path: Path) -> None:
        self.child = pexpect.spawn(
            PARLEY[0], [*PARLEY[1:], "-c", str(config), "chat"], cwd=str(ROOT), env=_env(tmp_path),
            encoding="utf-8", timeout=60, dimensions=(40, 100),
        )
        self.raw = ""
        self.prompt()

    def prompt(self) -> str:
        """Wait for the next prompt; returns what was printed since the previous one, plain."""
        self.child.expect(PROMPT)
        printed = self.child.before
        self.raw += printed + self.child.after
        return plain(printed)

    def ask(self, text: str) -> str:
        self.child.send(text + "\r")
        return self.prompt()

    def leave(self, keys: str) -> int:
        self.child.send(keys)
        self.child.expect(pexpect.EOF)
        self.raw += self.child.before
        self.child.close()
        return self.child.exitstatus


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


@pytest.fixture
def terminal(config, tmp_path):
    term = Terminal(config, tmp_path)
    yield term
    if term.child.isalive():
        term.child.terminate(force=True)


def job_statuses(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute("SELECT status FROM jobs ORDER BY id")]


def test_replies_render_as_markdown_and_exit_is_clean(terminal):
    shown = terminal.ask("markdown please")
    assert "Here is bold text and code." in shown  # emphasis and inline code rendered, not raw
    assert "**" not in shown and "`" not in shown
    assert "print('hi')" in shown
    assert "\x1b[" in terminal.raw.split("markdown please", 1)[1]  # styled: bold, highlighted code
    assert terminal.leave("/exit\r") == 0


def test_ctrl_c_stops_the_reply_and_the_prompt_returns(terminal, config, tmp_path):
    terminal.child.send("slow please\r")
    terminal.child.expect_exact("word3")
    terminal.child.sendintr()
    shown = terminal.prompt()
    assert terminal.child.isalive()
    assert "word3" in shown and "word59" not in shown
    assert "[stopped]" in shown
    db = tmp_path / "parley.db"
    assert job_statuses(db)[-1] == "cancelled"
    with sqlite3.connect(db) as connection:
        [(stored,)] = connection.execute("SELECT text FROM messages WHERE text LIKE 'word0 %'").fetchall()
    assert "word3" in stored and "word59" not in stored  # what was shown is kept
    # The stopped reply stays stopped: nothing is answered again at the next start.
    assert terminal.leave("\x04") == 0  # Ctrl-D
    again = Terminal(config, tmp_path)
    assert "word" not in again.raw
    assert again.leave("\x03\x03") == 0  # Ctrl-C twice at an empty prompt


def test_typing_during_a_reply_does_not_appear_in_it(terminal, model):
    terminal.child.send("slow please\r")
    terminal.child.expect_exact("word2")
    terminal.child.send("zzqq")
    shown = terminal.prompt()
    assert "word59" in shown and "zzqq" not in shown
    # What was typed waits for the prompt, and is sent as the next message.
    shown = terminal.ask("")
    assert "echo: zzqq" in shown
    assert terminal.leave("\x04") == 0


def test_retry_and_continue(terminal, model):
    assert "answer number 1" in terminal.ask("count please")
    again = terminal.ask("/retry")
    assert "answer number 2" in again
    cut = terminal.ask("cut please")
    assert CUT_REPLY in cut and "/continue to go on" in cut
    more = terminal.ask("/continue")
    assert "delta epsilon." in more and "alpha" not in more
    assert model.requests[-1][-1]["role"] == "assistant"
    assert terminal.leave("exit\r") == 0


def test_several_lines_make_one_message_and_history_is_kept(terminal, model, tmp_path):
    terminal.child.send("line one\\\r")
    terminal.child.send("line two\r")
    terminal.prompt()
    terminal.child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")
    terminal.prompt()
    users = [m["content"] for m in model.requests[-1] if m["role"] == "user"]
    assert users[-2:] == ["line one\nline two", "pasted one\npasted two"]
    assert terminal.leave("\x04") == 0
    history = (tmp_path / "data" / "parley" / "chat_history").read_text()
    assert "+line one" in history and "+pasted two" in history


def test_piped_markdown_stays_plain_text(config, tmp_path):
    result = subprocess.run(
        [*PARLEY, "-c", str(config), "chat"], input="markdown please\n", capture_output=True, text=True,
        timeout=120, cwd=ROOT, env=_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == f"Parley: {MARKDOWN_REPLY.strip()}"  # as it came, no escape codes


def test_ctrl_c_at_the_prompt_hints_then_leaves(terminal):
    terminal.child.send("half typed")
    terminal.child.sendintr()  # clears the line
    terminal.child.sendintr()  # an empty line: a hint
    terminal.child.expect_exact("Ctrl-C again")
    assert terminal.child.isalive()
    assert terminal.leave("\x03") == 0


def test_aliases_and_help(terminal):
    shown = terminal.ask("help")
    assert "/retry" in shown and "/continue" in shown and "Esc Enter" in shown
    assert "/reset" in shown  # the core's own /help came first
    assert "History cleared" in terminal.ask("clear")
    assert "no reply to answer again" in terminal.ask("/retry")
    assert terminal.leave("exit\r") == 0


# -- the renderer, without a terminal ----------------------------------------------------------


async def test_a_reply_taller_than_the_screen_keeps_the_live_area_on_it():
    import io

    from rich.console import Console

    from adapters import console_render
    from adapters.console_render import MarkdownStream

    height = 12
    console = Console(file=io.StringIO(), force_terminal=True, width=50, height=height, color_system=None)
    reply = (
        "Intro with **bold**.\n\n"
        + "\n".join(f"- item {i}" for i in range(40))
        + "\n\n```python\n"
        + "\n".join(f"print({i})" for i in range(40))
        + "\n```\n"
        + " ".join(f"Sentence {i} of a long paragraph." for i in range(60))
        + "\n\nThe end."
    )
    stream = MarkdownStream(console, "Parley")
    heights = []
    original, console_render.REFRESH_SECONDS = console_render.REFRESH_SECONDS, 0.0
    try:
        for end in range(1, len(reply) + 1, 7):
            await stream.update(reply[:end])
            heights.append(stream.live._live_render._shape[1] if stream.live._live_render._shape else 0)
        await stream.finish(reply)
    finally:
        console_render.REFRESH_SECONDS = original
    assert max(heights) <= height  # never redrawn past the top of the screen
    printed = plain(console.file.getvalue())
    for i in range(40):
        assert f"item {i}" in printed and f"print({i})" in printed
    assert "The end." in printed and "Sentence 59 of" in printed


def test_markdown_helpers():
    from adapters.console_render import new_part, open_fence, settle, terminal_markdown

    assert terminal_markdown("a\nb\n```\nx\ny\n```\n<think>") == "a  \nb  \n```\nx\ny\n```\n\\<think\\>  "
    assert open_fence("text\n```python\ncode") == "```python"
    assert open_fence("```\ncode\n```\n") is None
    head, cut, reopen, gap = settle("one\n\ntwo\nthree")
    assert (head, reopen, gap) == ("one", "", True) and "one\n\ntwo\nthree"[cut:] == "two\nthree"
    head, cut, reopen, gap = settle("x\n```py\na\nb\nc")
    assert head == "x\n```py\na\nb\n```" and reopen == "```py\n" and "x\n```py\na\nb\nc"[cut:] == "c"
    assert settle("oneword")[0] == ""
    head, cut, _, gap = settle("First sentence. Second one goes on")
    assert head == "First sentence." and not gap and "First sentence. Second one goes on"[cut:] == "Second one goes on"
    assert new_part("The quick brown fox", "The quick bro") == "wn fox"
    assert new_part("Done.\n\nMore", "Done. ") == "\n\nMore"

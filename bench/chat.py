"""Long multi-turn chats: Parley with its prefix cache on and off, and llama.cpp, side by side.

    .venv/bin/python bench/chat.py --quick        # ~3-5 minutes: cache on, cache off, llama.cpp; a 60 s soak
    .venv/bin/python bench/chat.py                # the full run (soaks both ways); refreshes the committed copies
    .venv/bin/python bench/chat.py --soak 300     # a longer soak (seconds)

Parley is driven through its real path, exactly as bench/throughput.py drives it (FakeAdapter →
router → SQLite storage → GenerationQueue → worker process whose replies ignore end-of-turn
tokens), every reply `NEW_TOKENS` long. The histories are made of "notes" (distinct generated text
per conversation, so no two conversations share a prefix past the system prompt). Workloads:

  a  one conversation with ~1.5k tokens of history: TTFT of its first question (cold) and of a follow-up;
  b  8 such conversations at once: TTFT p50/p95, cold and follow-up; aggregate tokens/s (prefill included);
  c  3 replies streaming when a question with ~3k tokens of history arrives: the longest pause
     between the deltas of those 3 streams against their median pause;
  d  decode tokens/s (after the first token; the sum of each stream's rate) of 8 conversations at
     ~1.5k tokens of context against 8 at a short context;
  e  a soak: 8 conversations at once whose history grows to ~3k tokens, then new ones, for --soak s.

Each Parley column runs in its own worker: `[worker] prefix_cache = true` and `= false` (the keys
are passed only where this tree's config knows them; without them the two columns are the same
code). Prefix-cache hits are the sum of `GenerationResult.cached_tokens` (0 where the field does
not exist) and whatever cache counters the client's health reports. llama.cpp (llama-cpp-python,
bench/llamacpp.py) runs the same GGUF: cold TTFT of workload a's prompt, follow-up TTFT with the
prefix it kept, and single-stream tokens/s. Written to bench/results/chat.json and chat.png; a full
run also to bench/chat_last_run.json, bench/chat.png and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.base import ReplyStream  # noqa: E402
from adapters.fake import FakeAdapter  # noqa: E402
from bench import llamacpp  # noqa: E402
from bench.common import write_results_section  # noqa: E402
from bench.throughput import CountingClient, percentile  # noqa: E402
from bot.core.config import ModelSettings, WorkerSettings, parse_settings  # noqa: E402
from bot.core.contracts import Outcome  # noqa: E402
from bot.core.types import ConversationKey  # noqa: E402
from bot.runtime.app import ParleyApp  # noqa: E402

NEW_TOKENS = 32
HISTORY_TOKENS = 1500
LONG_TOKENS = 3000
SYSTEM_PROMPT = "You are a helpful assistant."
RESULTS = ROOT / "bench" / "results"
QUESTIONS = ("Using the notes above, which project needs attention first?",
             "Thanks. Which two risks do the notes mention?",
             "Summarise the notes in one sentence.")
_WORDS = ("budget review", "supplier", "deadline", "prototype", "test run", "customer call", "migration",
          "design sketch", "invoice", "warehouse", "safety check", "release", "workshop", "survey", "backlog")
_PEOPLE = ("Ana", "Ben", "Chidi", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivo", "June", "Kofi", "Lena")


def make_notes(seed: int, tokens: int, count: Any) -> str:
    """Distinct, deterministic note lines for conversation `seed`, about `tokens` long."""
    rng = random.Random(seed)
    lines = [f"Notes of team {seed} (set {rng.randint(100, 999)}):"]
    total = count(lines[0])
    while total < tokens:
        line = (f"- Day {len(lines)}: {rng.choice(_PEOPLE)} moved the {rng.choice(_WORDS)} of project "
                f"{rng.randint(1, 40)} to {rng.choice(_WORDS)}, cost {rng.randint(10, 990)} euros, "
                f"risk {rng.choice(('low', 'medium', 'high'))}.")
        lines.append(line)
        total += count(line) + 1
    return "\n".join(lines)


# --- Parley through its real path -------------------------------------------------------------


@dataclass
class Turn:
    """One message and its reply: when it was sent, when each delta and the end arrived."""

    chat: str
    arrival: float
    job_id: int = 0
    updates: list[float] = field(default_factory=list)
    end: float | None = None
    failed: str | None = None

    @property
    def ttft(self) -> float:
        return (self.updates[0] if self.updates else self.end) - self.arrival  # type: ignore[operator]

    @property
    def decode_rate(self) -> float:
        first = self.updates[0] if self.updates else self.end
        return (NEW_TOKENS - 1) / (self.end - first) if self.end > first else float("nan")  # type: ignore[operator]


class _LoggedStream(ReplyStream):
    def __init__(self, inner: ReplyStream, turn: Turn) -> None:
        self.inner, self.turn = inner, turn

    async def update(self, text: str) -> None:
        self.turn.updates.append(time.perf_counter())
        await self.inner.update(text)

    async def finish(self, text: str) -> list[str]:
        self.turn.end = time.perf_counter()
        return await self.inner.finish(text)

    async def fail(self, notice: str) -> None:
        self.turn.failed, self.turn.end = notice, time.perf_counter()
        await self.inner.fail(notice)


class LoggingAdapter(FakeAdapter):
    """The in-memory FakeAdapter, noting the time of every delta of each conversation's current turn."""

    def __init__(self) -> None:
        super().__init__()
        self.current: dict[str, Turn] = {}

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, *args: Any, **kwargs: Any) -> ReplyStream:
        return _LoggedStream(await super().open_reply(conversation, reply_to, *args, **kwargs), self.current[conversation.key])


class RssSampler:
    """The worker's resident memory, sampled every 50 ms (psutil): peak since `reset`, and the last value."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = self.last = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        import psutil

        while True:
            try:
                self.last = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, self.last)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def reset(self) -> None:
        self.peak = self.last

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Session:
    """One Parley app and worker; sends messages in named conversations and waits for the replies."""

    def __init__(self, app: ParleyApp, adapter: LoggingAdapter, client: CountingClient) -> None:
        self.app, self.adapter, self.client = app, adapter, client
        self.cached_tokens = self.prompt_tokens = self.replies = 0

    async def send(self, chat: str, text: str) -> Turn:
        turn = self.adapter.current[chat] = Turn(chat, time.perf_counter())
        result = await self.adapter.say(text, chat=chat, user=f"u-{chat}", direct=True)
        assert result.outcome is Outcome.QUEUED, result
        turn.job_id = result.job_id  # type: ignore[assignment]
        return turn

    async def wait(self, turns: list[Turn]) -> list[Turn]:
        statuses = await asyncio.gather(*(self.app.router.wait_for(t.job_id) for t in turns))
        failed = [t.failed for t in turns if t.failed] + [s for s in statuses if s != "done"]
        if failed:
            raise RuntimeError(f"{len(failed)} replies failed: {failed[:3]}")
        for turn in turns:
            result = self.client.results[turn.job_id]
            if result.completion_tokens != NEW_TOKENS:
                raise RuntimeError(f"a reply was {result.completion_tokens} tokens long, not {NEW_TOKENS}")
            self.cached_tokens += int(getattr(result, "cached_tokens", 0) or 0)
            self.prompt_tokens += result.prompt_tokens
            self.replies += 1
        return turns

    async def ask(self, messages: dict[str, str]) -> list[Turn]:
        return await self.wait([await self.send(chat, text) for chat, text in messages.items()])

    def result(self, turn: Turn) -> Any:
        return self.client.results[turn.job_id]


def ttfts(turns: list[Turn]) -> dict[str, float]:
    values = [t.ttft for t in turns]
    return {"p50_s": round(percentile(values, 0.5), 3), "p95_s": round(percentile(values, 0.95), 3)}


def aggregate_rate(turns: list[Turn]) -> float:
    return round(NEW_TOKENS * len(turns) / (max(t.end for t in turns) - min(t.arrival for t in turns)), 1)  # type: ignore[type-var]


async def workloads(session: Session, notes: Any, soak_s: float, rss: RssSampler) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cold_text = f"Here are my notes:\n\n{notes(0, HISTORY_TOKENS)}\n\n{QUESTIONS[0]}"
    (cold,) = await session.ask({"a0": cold_text})
    (follow,) = await session.ask({"a0": QUESTIONS[1]})
    out["a"] = {"prompt_tokens": session.result(cold).prompt_tokens, "cold_ttft_s": round(cold.ttft, 3),
                "followup_prompt_tokens": session.result(follow).prompt_tokens,
                "followup_ttft_s": round(follow.ttft, 3),
                "followup_cached_tokens": getattr(session.result(follow), "cached_tokens", None)}
    out["_a_prompt"] = (await session.app.repo.get_job(cold.job_id)).prompt
    print(f"    a: 1 x {out['a']['prompt_tokens']} tokens: TTFT cold {cold.ttft:.3f} s, follow-up {follow.ttft:.3f} s", flush=True)

    chats = [f"b{i}" for i in range(8)]
    cold8 = await session.ask({c: f"Here are my notes:\n\n{notes(10 + i, HISTORY_TOKENS)}\n\n{QUESTIONS[0]}"
                               for i, c in enumerate(chats)})
    follow8 = await session.ask({c: QUESTIONS[1] for c in chats})
    out["b"] = {"cold_ttft": ttfts(cold8), "followup_ttft": ttfts(follow8),
                "cold_tokens_per_s": aggregate_rate(cold8), "followup_tokens_per_s": aggregate_rate(follow8)}
    b = out["b"]
    print(f"    b: 8 x ~{HISTORY_TOKENS}: TTFT cold p50 {b['cold_ttft']['p50_s']} p95 {b['cold_ttft']['p95_s']} s, "
          f"follow-up p50 {b['followup_ttft']['p50_s']} p95 {b['followup_ttft']['p95_s']} s; "
          f"{b['cold_tokens_per_s']} / {b['followup_tokens_per_s']} tok/s", flush=True)

    streams = [await session.send(f"p{i}", f"Tell me a short story about a {w}.") for i, w in enumerate(_WORDS[:3])]
    while not all(t.updates or t.end for t in streams):
        await asyncio.sleep(0.005)
    arrived = time.perf_counter() - streams[0].arrival
    long_turn = await session.send("q0", f"Here are my notes:\n\n{notes(99, LONG_TOKENS)}\n\n{QUESTIONS[0]}")
    await session.wait([*streams, long_turn])
    gaps = [b - a for t in streams for a, b in zip([*t.updates, t.end][:-1], [*t.updates, t.end][1:], strict=True)]
    longest, median = max(gaps), percentile(gaps, 0.5)
    out["c"] = {"long_prompt_tokens": session.result(long_turn).prompt_tokens, "long_ttft_s": round(long_turn.ttft, 3),
                "longest_pause_s": round(longest, 3), "median_pause_s": round(median, 4),
                "pause_ratio": round(longest / median, 1), "gaps": len(gaps),
                "_timeline": {t.chat: [round(u - streams[0].arrival, 4) for u in [*t.updates, t.end]] for t in streams}
                | {"arrival_of_long": round(arrived, 4)}}
    c = out["c"]
    print(f"    c: 3 streams + a {c['long_prompt_tokens']}-token question: longest pause {c['longest_pause_s']} s, "
          f"median {c['median_pause_s']} s (x{c['pause_ratio']}); its TTFT {c['long_ttft_s']} s", flush=True)

    long8 = await session.ask({ch: QUESTIONS[2] for ch in chats})
    short8 = await session.ask({f"s{i}": f"Tell me about the {w}." for i, w in enumerate(_WORDS[3:11])})
    long_ctx = round(sum(session.result(t).prompt_tokens for t in long8) / 8)
    out["d"] = {"long_context_tokens": long_ctx, "long_decode_tokens_per_s": round(sum(t.decode_rate for t in long8), 1),
                "short_context_tokens": round(sum(session.result(t).prompt_tokens for t in short8) / 8),
                "short_decode_tokens_per_s": round(sum(t.decode_rate for t in short8), 1)}
    d = out["d"]
    d["ratio"] = round(d["long_decode_tokens_per_s"] / d["short_decode_tokens_per_s"], 2)
    print(f"    d: decode 8 @ {long_ctx}: {d['long_decode_tokens_per_s']} tok/s, 8 @ {d['short_context_tokens']}: "
          f"{d['short_decode_tokens_per_s']} tok/s (x{d['ratio']})", flush=True)
    if soak_s > 0:
        out["e"] = await soak(session, notes, soak_s, rss)
    return out


async def soak(session: Session, notes: Any, seconds: float, rss: RssSampler) -> dict[str, Any]:
    """8 conversations at once, each message adding 150-500 tokens of notes, new ones past ~3k tokens."""
    deadline = time.perf_counter() + seconds
    turns: list[Turn] = []
    longest = [0]
    cached_before, rss_start = session.cached_tokens, rss.last
    rss.reset()

    async def lane(index: int) -> None:
        rng = random.Random(1000 + index)
        generation = 0
        while time.perf_counter() < deadline:
            chat, context = f"soak{index}-{generation}", 0
            while time.perf_counter() < deadline and context < LONG_TOKENS:
                text = f"More notes:\n{notes(rng.randint(0, 10**6), rng.randint(150, 500))}\n{rng.choice(QUESTIONS)}"
                (turn,) = await session.ask({chat: text})
                turns.append(turn)
                context = session.result(turn).prompt_tokens + NEW_TOKENS
                longest[0] = max(longest[0], context)
            generation += 1

    began = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(8)))
    wall = time.perf_counter() - began
    out = {"seconds": round(wall, 1), "replies": len(turns), "tokens_per_s": round(NEW_TOKENS * len(turns) / wall, 1),
           "ttft": ttfts(turns), "longest_context": longest[0], "cached_tokens": session.cached_tokens - cached_before,
           "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss.last / 2**20, 1),
           "peak_rss_mb": round(rss.peak / 2**20, 1)}
    print(f"    e: soak {out['seconds']} s: {out['replies']} replies, {out['tokens_per_s']} tok/s, TTFT p50 "
          f"{out['ttft']['p50_s']} p95 {out['ttft']['p95_s']} s, contexts up to {out['longest_context']}, worker RSS "
          f"{out['rss_start_mb']} -> {out['rss_end_mb']} MB, peak {out['peak_rss_mb']} MB", flush=True)
    return out


def cache_keys(enabled: bool) -> dict[str, Any]:
    """The [worker] keys of the prefix cache, where this tree's config has them."""
    known = {f.name for f in fields(WorkerSettings)}
    return {"prefix_cache": enabled} if "prefix_cache" in known else {}


async def run_parley(label: str, enabled: bool, notes: Any, soak_s: float) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="parley-chat-bench-"))
    keys = cache_keys(enabled)
    settings = parse_settings({
        "model": {},
        "worker": {"max_batch": 32, "ready_timeout": 600, **keys},
        "queue": {"max_pending": 1000, "max_pending_per_conversation": 4, "max_pending_per_user": 4,
                  "user_messages_per_minute": 100_000},
        "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0},
        "bot": {"system_prompt": SYSTEM_PROMPT, "log_level": "WARNING", "max_input_chars": 200_000},
        "storage": {"url": f"sqlite+aiosqlite:///{folder}/bench.db"},
        "console": {"enabled": False},
    })
    print(f"{label}: [worker] {keys or 'prefix_cache (not in this tree: the default engine)'}", flush=True)
    adapter, client = LoggingAdapter(), CountingClient(settings)
    try:
        async with ParleyApp(settings, [adapter], client=client) as app:
            session = Session(app, adapter, client)
            rss = RssSampler((await client.health()).pid)  # type: ignore[arg-type]
            rss.start()
            await asyncio.sleep(0.3)
            idle_mb = round(rss.last / 2**20, 1)
            figures = await workloads(session, notes, soak_s, rss)
            health = await client.health()
            await rss.stop()
        figures.update(
            worker_keys=keys, idle_rss_mb=idle_mb, peak_rss_mb=round(max(rss.peak, figures.get("e", {}).get("peak_rss_mb", 0) * 2**20) / 2**20, 1),
            cached_tokens_total=session.cached_tokens, prompt_tokens_total=session.prompt_tokens, replies=session.replies,
            engine_counters={k: v for k, v in health.extra.items() if "cache" in k or "prefix" in k or "evict" in k},
            info=f"{client.model_info.dtype}, {client.model_info.quantization}, {client.model_info.device}",  # type: ignore[union-attr]
        )
        print(f"    prefix-cache hits: {session.cached_tokens} of {session.prompt_tokens} prompt tokens reused; "
              f"engine counters {figures['engine_counters'] or 'not reported'}; worker peak RSS {figures['peak_rss_mb']} MB",
              flush=True)
        return figures
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- llama.cpp on the same GGUF ---------------------------------------------------------------


def run_llamacpp(tokenizer: Any, a_prompt: list[dict[str, str]]) -> dict[str, Any]:
    def ids(chat: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    llm = llamacpp.load(n_ctx=8192)
    short = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Tell me about the prototype."}]
    llamacpp.stream(llm, ids(short), 4, cold=True)  # warm-up
    singles = [llamacpp.stream(llm, ids(short), NEW_TOKENS, cold=True) for _ in range(3)]
    cold = llamacpp.stream(llm, ids(a_prompt), NEW_TOKENS, cold=True)
    reply = tokenizer.decode(cold["ids"], skip_special_tokens=True)
    follow_chat = [*a_prompt, {"role": "assistant", "content": reply}, {"role": "user", "content": QUESTIONS[1]}]
    follow = llamacpp.stream(llm, ids(follow_chat), NEW_TOKENS, cold=False)
    best = min(singles, key=lambda s: s["total_s"])
    out = {
        "version": llamacpp.version(), "threads": llamacpp.threads(), "n_ctx": 8192,
        "prompt_tokens": len(ids(a_prompt)), "cold_ttft_s": round(cold["first_s"], 3),
        "followup_ttft_s": round(follow["first_s"], 3),
        "decode_tokens_per_s_at_1.5k": round(cold["decode_tokens_per_s"], 1),
        "single_stream_tokens_per_s": round(NEW_TOKENS / best["total_s"], 1),
        "single_stream_decode_tokens_per_s": round(best["decode_tokens_per_s"], 1),
    }
    print(f"llama.cpp {out['version']}: TTFT cold {out['cold_ttft_s']} s ({out['prompt_tokens']} tokens), follow-up "
          f"{out['followup_ttft_s']} s; single stream {out['single_stream_tokens_per_s']} tok/s (decode "
          f"{out['single_stream_decode_tokens_per_s']}), decode at 1.5k {out['decode_tokens_per_s_at_1.5k']}", flush=True)
    return out


# --- report -----------------------------------------------------------------------------------


def checks(report: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The issue's targets: (what, passed or None where it cannot be judged, the figures)."""
    on, off, llama = report["parley"].get("cache on"), report["parley"].get("cache off"), report.get("llama.cpp")
    lines: list[tuple[str, bool | None, str]] = []
    on_f, off_f = on["b"]["followup_ttft"]["p50_s"], off["b"]["followup_ttft"]["p50_s"]
    gain = off_f / on_f if on_f else float("inf")
    lines.append(("follow-up TTFT p50 at 8x1.5k: >= 15x lower with the cache than without", gain >= 15,
                  f"{off_f} s / {on_f} s = x{gain:.1f}"))
    if llama:
        lines.append(("follow-up TTFT p50 at 8x1.5k with the cache < llama.cpp cold TTFT", on_f < llama["cold_ttft_s"],
                      f"{on_f} s vs {llama['cold_ttft_s']} s"))
    else:
        lines.append(("follow-up TTFT p50 at 8x1.5k with the cache < llama.cpp cold TTFT", None, "llama.cpp skipped"))
    for label, figures in report["parley"].items():
        c, d = figures["c"], figures["d"]
        lines.append((f"{label}: longest pause <= 5x median pause", c["pause_ratio"] <= 5,
                      f"{c['longest_pause_s']} s / {c['median_pause_s']} s = x{c['pause_ratio']}"))
        lines.append((f"{label}: 8@1.5k decode tok/s >= 0.5x 8@short", d["ratio"] >= 0.5,
                      f"{d['long_decode_tokens_per_s']} / {d['short_decode_tokens_per_s']} = x{d['ratio']}"))
    return lines


def table(report: dict[str, Any]) -> list[str]:
    columns = list(report["parley"].items())
    llama = report.get("llama.cpp")
    head = ["figure", *(f"Parley {k}" for k, _ in columns), "llama.cpp"]

    def row(name: str, get: Any, llama_value: Any = "") -> list[str]:
        return [name, *(str(get(f)) for _, f in columns), str(llama_value if llama else "skipped")]

    rows = [
        row("a: prompt tokens", lambda f: f["a"]["prompt_tokens"], llama and llama["prompt_tokens"]),
        row("a: TTFT cold (s)", lambda f: f["a"]["cold_ttft_s"], llama and llama["cold_ttft_s"]),
        row("a: TTFT follow-up (s)", lambda f: f["a"]["followup_ttft_s"], llama and llama["followup_ttft_s"]),
        row("b: 8x TTFT cold p50 / p95 (s)", lambda f: f"{f['b']['cold_ttft']['p50_s']} / {f['b']['cold_ttft']['p95_s']}"),
        row("b: 8x TTFT follow-up p50 / p95 (s)", lambda f: f"{f['b']['followup_ttft']['p50_s']} / {f['b']['followup_ttft']['p95_s']}"),
        row("b: tok/s cold / follow-up (prefill incl.)", lambda f: f"{f['b']['cold_tokens_per_s']} / {f['b']['followup_tokens_per_s']}"),
        row("c: longest / median pause (s)", lambda f: f"{f['c']['longest_pause_s']} / {f['c']['median_pause_s']} (x{f['c']['pause_ratio']})"),
        row("c: TTFT of the 3k question (s)", lambda f: f["c"]["long_ttft_s"]),
        row("d: decode tok/s 8@1.5k / 8@short", lambda f: f"{f['d']['long_decode_tokens_per_s']} / {f['d']['short_decode_tokens_per_s']} (x{f['d']['ratio']})",
            llama and f"1 stream: {llama['decode_tokens_per_s_at_1.5k']} / {llama['single_stream_decode_tokens_per_s']}"),
        row("single stream tok/s (short prompt)", lambda f: "", llama and llama["single_stream_tokens_per_s"]),
        row("e: soak replies, tok/s, TTFT p95", lambda f: (f"{f['e']['replies']}, {f['e']['tokens_per_s']}, {f['e']['ttft']['p95_s']} s"
                                                          if "e" in f else "-")),
        row("e: soak worker RSS start -> end (MB)", lambda f: f"{f['e']['rss_start_mb']} -> {f['e']['rss_end_mb']}" if "e" in f else "-"),
        row("prefix-cache tokens reused / prompt tokens", lambda f: f"{f['cached_tokens_total']} / {f['prompt_tokens_total']}"),
        row("engine cache counters", lambda f: json.dumps(f["engine_counters"]) if f["engine_counters"] else "-"),
        row("worker peak RSS (MB)", lambda f: f["peak_rss_mb"]),
    ]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft, decode, pauses) = plt.subplots(1, 3, figsize=(14, 4.2))
    names = ["1x cold", "1x follow-up", "8x cold p50", "8x follow-up p50"]
    systems = {f"Parley, {k}": [f["a"]["cold_ttft_s"], f["a"]["followup_ttft_s"], f["b"]["cold_ttft"]["p50_s"],
                                f["b"]["followup_ttft"]["p50_s"]] for k, f in report["parley"].items()}
    if report.get("llama.cpp"):
        llama = report["llama.cpp"]
        systems["llama.cpp"] = [llama["cold_ttft_s"], llama["followup_ttft_s"], float("nan"), float("nan")]
    width = 0.8 / len(systems)
    for index, (name, values) in enumerate(systems.items()):
        ttft.bar([i + index * width for i in range(len(names))], values, width, label=name)
    ttft.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
    ttft.set_yscale("log")
    ttft.set_ylabel(f"time to first token (s), ~{HISTORY_TOKENS} tokens of history")
    ttft.legend(fontsize=7)
    labels, values = [], []
    for k, f in report["parley"].items():
        labels += [f"{k}\n8@{f['d']['long_context_tokens']}", f"{k}\n8@{f['d']['short_context_tokens']}"]
        values += [f["d"]["long_decode_tokens_per_s"], f["d"]["short_decode_tokens_per_s"]]
    if report.get("llama.cpp"):
        labels += ["llama.cpp\n1@1.5k", "llama.cpp\n1@short"]
        values += [report["llama.cpp"]["decode_tokens_per_s_at_1.5k"], report["llama.cpp"]["single_stream_decode_tokens_per_s"]]
    decode.bar(range(len(values)), values, color=["C0", "C9"] * (len(values) // 2))
    decode.set_xticks(range(len(values)), labels, fontsize=7)
    decode.set_ylabel("decode tokens/s (after the first token)")
    for offset, (k, f) in enumerate(report["parley"].items()):
        timeline = dict(f["c"]["_timeline"])
        arrival = timeline.pop("arrival_of_long")
        for row, times in enumerate(timeline.values()):
            pauses.plot(times, [offset * 4 + row] * len(times), "|", markersize=10, color=f"C{offset}",
                        label=f"Parley, {k}" if row == 0 else None)
        pauses.axvline(arrival, color=f"C{offset}", linestyle="--", alpha=0.5)
    pauses.set_xlabel("s since the 3 streams' messages (dashed: the 3k-token question arrives)")
    pauses.set_yticks([])
    pauses.legend(fontsize=7)
    figure.suptitle(f"Long chats, {report['model']}, {NEW_TOKENS} new tokens each, {report['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Long chats: last full run of `bench/chat.py`", "",
             f"{report['model']}; {report['machine']}; {NEW_TOKENS} new tokens per reply; {report['date']}; "
             f"{report['bench_seconds']} s. Regenerated by the benchmark (`bench/chat_last_run.json` has every figure).", ""]
    lines += table(report) + [""]
    lines += [f"- {'PASS' if ok else 'FAIL' if ok is False else 'SKIP'}: {what} ({figures})" for what, ok, figures in report["checks"]]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bot.worker import model_folder

    tokenizer = AutoTokenizer.from_pretrained(model_folder(ModelSettings()))
    lengths: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in lengths:
            lengths[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return lengths[text]

    def notes(seed: int, tokens: int) -> str:
        return make_notes(seed, tokens, count)

    soak_s = args.soak if args.soak is not None else (60.0 if args.quick else 120.0)
    parley: dict[str, Any] = {}
    for label, enabled in (("cache on", True), ("cache off", False)):
        parley[label] = await run_parley(f"Parley, {label}", enabled, notes, soak_s if enabled or not args.quick else 0)
    a_prompt = parley["cache on"].pop("_a_prompt")
    parley["cache off"].pop("_a_prompt")
    missing = llamacpp.missing_reason()
    llama = None
    if missing:
        print(f"llama.cpp: skipped: {missing}", flush=True)
    else:
        llama = run_llamacpp(tokenizer, a_prompt)
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "model": "SmolLM2-135M-Instruct (embedded)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}",
        "new_tokens": NEW_TOKENS,
        "prefix_cache_in_tree": bool(cache_keys(True)),
        "parley": parley,
        "llama.cpp": llama,
        "llama.cpp_skipped": missing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 60 s soak with the cache on only (~3-5 minutes in all)")
    parser.add_argument("--soak", type=float, default=None, help="soak seconds (default 60 quick, 120 full; 0: none)")
    parser.add_argument("--history", type=int, default=HISTORY_TOKENS,
                        help=f"tokens of history of workloads a, b, d (default {HISTORY_TOKENS}; c has twice as many)")
    args = parser.parse_args()
    globals().update(HISTORY_TOKENS=args.history, LONG_TOKENS=2 * args.history)  # one knob for smoke runs
    began = time.perf_counter()
    report = asyncio.run(main_async(args))
    report["bench_seconds"] = round(time.perf_counter() - began, 1)
    report["checks"] = checks(report)
    if not report["prefix_cache_in_tree"]:
        print("note: [worker] prefix_cache is not in this tree's config: 'cache on' and 'cache off' ran the same engine")
    print("\n".join(table(report)))
    for what, ok, figures in report["checks"]:
        print(f"{'PASS' if ok else 'FAIL' if ok is False else 'SKIP'}: {what} ({figures})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chat.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "chat.png")
    if not args.quick:
        # The committed copies: only a full run replaces them.
        shutil.copyfile(RESULTS / "chat.json", ROOT / "bench" / "chat_last_run.json")
        shutil.copyfile(RESULTS / "chat.png", ROOT / "bench" / "chat.png")
        write_results_section("chat", markdown(report))
    print(f"wrote {RESULTS / 'chat.json'} and {RESULTS / 'chat.png'} in {report['bench_seconds']} s")


if __name__ == "__main__":
    main()

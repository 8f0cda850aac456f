"""Weight-only int8 for CPU decode steps of a few rows: every linear layer keeps an int8 copy of its
weight (one scale per output row) for torch's fused kernel (`aten._weight_int8pack_mm`), used when a
forward has at most `INT8_MAX_ROWS` rows; larger forwards (batches, prefill) use the bf16 weight.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth (the seed's
point): half the bytes of bf16 is nearly twice the speed. Measured on a 2-core avx512_bf16 EPYC with
the embedded SmolLM2-135M: the kernel runs the model's matrix-vector products 2-3x faster than bf16
(576x576: 23 us against 50; the 49152-row output layer 2.8 ms against 6.0), at a relative error of
~0.8% per product (bf16 itself rounds at ~0.4%). The kernel does not reuse a weight across rows, so
at 8 rows it is as slow as bf16's matrix product and at 16 rows 1.5x slower (one layer's four
shapes: 1 row 78 us against 196, 16 rows 491 against 324, 512 rows 15.6 ms against 5.4): hence
both copies, at the cost of half the bf16 weights' memory again. The embedded GGUF is itself 4-bit (Q4_1), which
is what llama.cpp reads; bitsandbytes nf4 on top of it quantizes twice and visibly hurt answers,
while per-row int8 of the converted weights keeps them. Activations, the KV cache and the
embedding lookup stay bf16.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Int8Linear", "quantize_int8", "int8_supported", "INT8_MAX_ROWS"]

INT8_MAX_ROWS = 5
"""Forwards of at most this many rows (tokens) use the int8 weight; larger ones the bf16 weight. Five:
a reply decoding alone, and its check of 4 draft tokens (`[worker] draft_tokens`) with the token before."""


class Int8Linear(nn.Module):
    """A `nn.Linear` with an int8 copy of its weight (symmetric, one scale per output row) for
    forwards of at most `INT8_MAX_ROWS` rows."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared with a tied embedding, if any
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > INT8_MAX_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        if rows.dtype != self.scales.dtype:
            rows = rows.to(self.scales.dtype)
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def int8_supported(dtype: torch.dtype) -> bool:
    """Whether this torch has the kernel for `dtype` activations on CPU."""
    try:
        weight = torch.ones(8, 32, dtype=torch.int8)
        torch.ops.aten._weight_int8pack_mm(torch.ones(1, 32, dtype=dtype), weight, torch.ones(8, dtype=dtype))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def quantize_int8(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by an `Int8Linear` in place; how many were replaced.
    A tied output layer keeps sharing its weight with the embedding."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced

"""A KV cache that grows in place: appending a decode step's keys and values writes one column
into spare room, instead of `torch.cat` copying the whole cache every step.

Measured on a 2-core CPU with SmolLM2-135M (bf16), 8 rows at 1.5k tokens of context: transformers'
`DynamicLayer` concatenated each layer's keys and values every step, and those copies took 40% of
the step (more than the attention itself). See bench/README.md, "Long-context decoding".

`GrowingLayer` keeps each layer's keys and values in a buffer with room for up to `headroom` more
columns (an eighth of what it holds, so spare memory stays within ~12% of the cache); `keys` and `values` are views of the filled part. Assigning them (the decode batch
splices rows in, cuts rows and columns out) stores the new tensor as the buffer; the next append
then makes room again, so every code path that treats the layer as a `DynamicLayer` still works.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "GrowingCache", "DEFAULT_HEADROOM"]

DEFAULT_HEADROOM = 256
"""The most columns of spare room a layer takes when it must grow (an eighth of its length, at least
`_LEAST_ROOM`): the cache is copied once per that many steps instead of every step."""
_LEAST_ROOM = 32


class _Buffer:
    """One tensor [batch, heads, capacity, head_dim] of which the first `length` columns are filled."""

    __slots__ = ("data", "length")

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.length = data.shape[-2] if data.dim() == 4 else 0  # transformers starts a layer with an empty 1-d tensor

    @property
    def view(self) -> torch.Tensor:
        if self.length == self.data.shape[-2]:
            return self.data
        return self.data[:, :, : self.length]

    def append(self, new: torch.Tensor, headroom: int) -> torch.Tensor:
        data, length, count = self.data, self.length, new.shape[-2]
        if data.dim() != 4 or data.shape[:2] != new.shape[:2] or length + count > data.shape[-2]:
            # Room for an eighth more columns (at least 32, at most `headroom`): the spare memory stays
            # a small share of the cache, and a copy happens once every that many steps.
            room = max(_LEAST_ROOM, min(headroom, (length + count) // 8))
            grown = data.new_empty((*new.shape[:2], length + count + room, new.shape[-1])) if data.dim() == 4 else None
            if grown is None:
                grown = new.new_empty((*new.shape[:2], count + room, new.shape[-1]))
            elif length:
                grown[:, :, :length] = data[:, :, :length]
            self.data = data = grown
        data[:, :, length : length + count] = new
        self.length = length + count
        return self.view


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose appends write into spare room (see the module's docstring)."""

    headroom = DEFAULT_HEADROOM

    def __init__(self, **kwargs: object) -> None:
        self._keys: _Buffer | None = None
        self._values: _Buffer | None = None
        super().__init__(**kwargs)

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys.view

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys = None if tensor is None else _Buffer(tensor)

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values.view

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values = None if tensor is None else _Buffer(tensor)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._keys is not None and self._values is not None
        if self._keys.length == 0:  # the first fill (a prefill): no spare room until a decode step
            self._keys, self._values = _Buffer(key_states), _Buffer(value_states)
            return key_states, value_states
        return self._keys.append(key_states, self.headroom), self._values.append(value_states, self.headroom)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` columns (a negative count, as `DynamicLayer.crop`
        takes it), keeping the room: rejected draft tokens of speculative decoding."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of columns to remove")
        if tokens_to_remove == 0 or self._keys is None or self._values is None:
            return
        for buffer in (self._keys, self._values):
            buffer.length = max(0, buffer.length + tokens_to_remove)

    @property
    def spare_bytes(self) -> int:
        """Bytes held beyond the filled columns (the room to grow)."""
        spare = 0
        for buffer in (self._keys, self._values):
            if buffer is not None and buffer.data.dim() == 4:
                spare += (buffer.data.shape[-2] - buffer.length) * buffer.data[:, :, :1].numel() * buffer.data.element_size()
        return spare


class GrowingCache(DynamicCache):
    """A `DynamicCache` whose plain (full-attention) layers are `GrowingLayer`s; other layer kinds
    (sliding window, offloaded) stay as transformers made them."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]

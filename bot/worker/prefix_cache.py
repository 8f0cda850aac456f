"""The prefix cache: the KV cache of finished rows, kept so that a later prompt that starts with the
same tokens (the same conversation's next turn, or a shared system prompt) prefills only the rest.

An entry is keyed by the token ids its KV holds (a row's prompt and the tokens it fed back), never
by a conversation: a prompt that diverges anywhere (another system prompt, a reset, a trimmed
history) reuses only the tokens before the divergence. Entries live on the model's device and are
bounded by a byte budget, evicted least recently used first; the engine also evicts to make room
for its decode batch, since both share one KV memory budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count

import torch
from transformers import DynamicCache

from bot.worker.kv import GrowingCache

__all__ = ["PrefixCache", "PrefixMatch", "LayerKV"]

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, the keys and values of one row: [1, kv_heads, tokens, head_dim] each."""


@dataclass(eq=False)
class _Entry:
    ids: torch.Tensor  # int64 on the CPU, for fast prefix comparisons
    kv: LayerKV
    nbytes: int


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a prompt: `tokens` ids, taken from one entry."""

    entry_key: int
    tokens: int


class PrefixCache:
    """Finished rows' KV by token sequence, within `capacity_bytes`; see the module docstring.

    Engine thread only (no locking). `hits`, `misses`, `evictions`, `tokens_reused` count what
    happened; `peak_bytes` is the most the entries ever held together.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, capacity_bytes)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._keys = count()
        self.bytes = 0
        self.peak_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt_ids: Sequence[int]) -> PrefixMatch | None:
        """The entry sharing the longest prefix with `prompt_ids` (at most all but its last token,
        which must be prefilled to get the next token's scores), marked as just used; None if none
        shares a token. Counts nothing: `take` does."""
        limit = len(prompt_ids) - 1
        if limit <= 0 or not self._entries:
            return None
        query = torch.tensor(prompt_ids[:limit], dtype=torch.long)
        best: tuple[int, int] | None = None
        for key, entry in self._entries.items():
            shared = min(limit, entry.ids.shape[0])
            differ = (entry.ids[:shared] != query[:shared]).nonzero()
            length = int(differ[0, 0]) if differ.numel() else shared
            if length > 0 and (best is None or length >= best[1]):  # ties: the most recently used
                best = (key, length)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return PrefixMatch(*best)

    def take(self, prompt_ids: Sequence[int], cache_config: object) -> tuple[DynamicCache | None, int]:
        """A fresh batch-1 `DynamicCache` holding the longest cached prefix of `prompt_ids`, and its
        length; (None, 0) on a miss. The entry is copied, never shared, so it stays intact."""
        found = self.match(prompt_ids)
        entry = self._entries.get(found.entry_key) if found is not None else None
        if found is None or entry is None:
            self.misses += 1
            return None, 0
        cache = GrowingCache(config=cache_config)
        for layer, (keys, values) in zip(cache.layers, entry.kv, strict=True):
            # A copy: the row's cache later grows and is cropped in place.
            layer.update(keys[:, :, : found.tokens].clone(), values[:, :, : found.tokens].clone())
        self.hits += 1
        self.tokens_reused += found.tokens
        return cache, found.tokens

    def insert(self, ids: Sequence[int], kv: Callable[[], LayerKV], bytes_per_token: int, room: int | None = None) -> bool:
        """Keep the KV of `ids` (made by `kv()`, called only if it is kept) within `room` bytes (and
        `capacity_bytes`), evicting the least recently used entries as needed. Entries that are a
        prefix of `ids` are dropped (superseded); if `ids` is a prefix of an entry, nothing is added."""
        if not ids:
            return False
        new = torch.tensor(ids, dtype=torch.long)
        for key, entry in list(self._entries.items()):
            length = entry.ids.shape[0]
            shared = min(length, new.shape[0])
            if not torch.equal(entry.ids[:shared], new[:shared]):
                continue
            if length >= new.shape[0]:
                self._entries.move_to_end(key)  # it already holds all of this
                return False
            self._drop(key)
        nbytes = len(ids) * bytes_per_token
        limit = self.capacity_bytes if room is None else min(room, self.capacity_bytes)
        if nbytes > limit:
            return False
        self.evict_to(limit - nbytes)
        layers = kv()
        nbytes = sum(keys.nbytes + values.nbytes for keys, values in layers)
        self._entries[next(self._keys)] = _Entry(new, layers, nbytes)
        self.bytes += nbytes
        if self.bytes > limit:  # a dtype other than the estimate's: keep the bound all the same
            self.evict_to(limit)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

    def evict_to(self, most_bytes: int) -> int:
        """Evict least recently used entries until they hold at most `most_bytes`; how many went."""
        evicted = 0
        while self._entries and self.bytes > most_bytes:
            self._drop(next(iter(self._entries)))
            evicted += 1
        self.evictions += evicted
        return evicted

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes

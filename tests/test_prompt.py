from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.errors import JobFailed
from bot.generation.prompt import PromptTooLong, fit_to_budget
from bot.core.types import ChatMessage


class WordCounter:
    """A stand-in for chat-template tokenization: 3 tokens of framing per message plus its words."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: Sequence[ChatMessage]) -> int:
        self.calls += 1
        return sum(3 + len(message.content.split()) for message in messages)


def turn(role: str, words: int, tag: str = "w") -> ChatMessage:
    return ChatMessage(role, " ".join(f"{tag}{i}" for i in range(words)))


def chat(turns: int, words: int = 5, system: bool = True) -> list[ChatMessage]:
    messages = [turn("system", 4, "s")] if system else []
    for index in range(turns):
        messages.append(turn("user" if index % 2 == 0 else "assistant", words, f"t{index}-"))
    return messages


def test_everything_fits_nothing_dropped() -> None:
    messages = chat(6)
    counter = WordCounter()
    kept, dropped = fit_to_budget(messages, counter(messages), counter)
    assert kept == tuple(messages)
    assert dropped == 0


def test_drops_oldest_first_and_keeps_system_and_newest() -> None:
    messages = chat(21)
    counter = WordCounter()
    budget = counter(messages) // 2
    kept, dropped = fit_to_budget(messages, budget, counter)
    assert dropped > 0
    assert kept[0] == messages[0]  # the system message
    assert kept[-1] == messages[-1]  # the newest message
    assert kept[1:] == tuple(messages[1 + dropped :])  # a suffix of the history: the oldest went first
    assert counter(kept) <= budget
    assert len(kept) + dropped == len(messages)


def test_result_fits_and_leaves_out_at_most_a_quarter_more_than_needed() -> None:
    messages = [turn("user", 5, f"u{index}-") for index in range(30)]
    counter = WordCounter()
    budget = counter(messages[-7:]) + 1  # the newest 7 fit, 8 do not
    kept, dropped = fit_to_budget(messages, budget, counter)
    assert kept == tuple(messages[dropped:])
    assert counter(kept) <= budget
    # Cut on a grid a quarter of the budget apart: at most a quarter (plus one message) more than needed.
    assert counter(kept) >= budget - budget // 4 - counter(messages[:1])
    assert 23 <= dropped


def test_no_system_message_keeps_newest() -> None:
    messages = chat(9, system=False)
    counter = WordCounter()
    kept, dropped = fit_to_budget(messages, counter(messages[-1:]), counter)
    assert kept == (messages[-1],)
    assert dropped == len(messages) - 1


def test_does_not_open_the_history_with_an_assistant_turn() -> None:
    messages = chat(10) + [turn("user", 5, "last")]  # system, then user/assistant turns, then a user
    counter = WordCounter()
    for budget in range(counter([messages[0], messages[-1]]), counter(messages)):
        kept, dropped = fit_to_budget(messages, budget, counter)
        if dropped:
            assert kept[1].role != "assistant" or len(kept) == 2, (budget, kept)


def test_prompt_too_long() -> None:
    messages = [turn("system", 10), turn("user", 3), turn("assistant", 3), turn("user", 500)]
    counter = WordCounter()
    with pytest.raises(PromptTooLong) as caught:
        fit_to_budget(messages, 100, counter)
    error = caught.value
    assert isinstance(error, JobFailed)
    assert error.budget == 100
    assert error.tokens == counter([messages[0], messages[-1]])
    assert str(error.tokens) in str(error) and "100" in str(error) and "too long" in str(error)


def test_single_message_too_long() -> None:
    with pytest.raises(PromptTooLong):
        fit_to_budget([turn("user", 50)], 10, WordCounter())


def test_counts_tokens_a_logarithmic_number_of_times() -> None:
    messages = chat(2000)
    counter = WordCounter()
    budget = counter(messages) // 3
    counter.calls = 0
    fit_to_budget(messages, budget, counter)
    assert counter.calls <= 4 + 2 * math.ceil(math.log2(2000))


def test_empty_chat_is_an_error() -> None:
    with pytest.raises(ValueError):
        fit_to_budget([], 100, WordCounter())


def reference_fit(messages: list[ChatMessage], budget: int, count) -> tuple[tuple[ChatMessage, ...], int] | None:
    """Linear scan over the grid: grid lines every budget // 4 tokens of history, counted from the
    first given message; the first line from which on everything fits (the history starting at
    the first message at or after it, never with an assistant turn once anything was left out)."""
    head = messages[:1] if messages[0].role == "system" and len(messages) > 1 else []
    newest = 1
    if messages[-1].role == "assistant" and len(messages) - len(head) >= 2 and messages[-2].role == "user":
        newest = 2
    older = messages[len(head) : len(messages) - newest]
    tail = messages[len(messages) - newest :]
    tokens = [count(head + older[drop:] + tail) for drop in range(len(older) + 1)]

    def skip(drop: int) -> int:
        while drop and drop < len(older) and older[drop].role == "assistant":
            drop += 1
        return drop

    if tokens[0] <= budget:
        return tuple(messages), 0
    if tokens[len(older)] > budget:
        return None
    step = max(1, budget // 4)
    for line in range(step, 10**9, step):
        cut = next((drop for drop in range(len(older) + 1) if tokens[0] - tokens[drop] >= line), len(older))
        if tokens[skip(cut)] <= budget:
            return tuple(head + older[skip(cut) :] + tail), skip(cut)
    raise AssertionError("unreachable")


roles = st.sampled_from(["user", "assistant"])
messages_strategy = st.lists(st.tuples(roles, st.integers(0, 30)), min_size=1, max_size=40)


@settings(max_examples=2000, deadline=None)
@given(history=messages_strategy, has_system=st.booleans(), budget=st.integers(0, 600))
def test_property_matches_a_linear_reference(history, has_system, budget) -> None:
    messages = ([turn("system", 6, "s")] if has_system else []) + [
        turn(role, words, f"m{index}-") for index, (role, words) in enumerate(history)
    ]
    counter = WordCounter()
    expected = reference_fit(messages, budget, WordCounter())
    if expected is None:
        with pytest.raises(PromptTooLong):
            fit_to_budget(messages, budget, counter)
        return
    kept, dropped = fit_to_budget(messages, budget, counter)
    assert (kept, dropped) == expected
    assert counter(kept) <= budget
    assert kept[-1] == messages[-1]
    if has_system:
        assert kept[0] == messages[0]
    assert counter.calls <= 4 + 2 * math.ceil(math.log2(len(messages) + 1))
    tail = 2 if len(messages) - has_system >= 2 and messages[-1].role == "assistant" and messages[-2].role == "user" else 1
    assert kept[len(kept) - tail :] == tuple(messages[len(messages) - tail :])


# -- stable cuts: consecutive turns share a prefix (issue 13) ----------------------------------------


def grown_conversation(turns: int, seed: int = 0) -> list[ChatMessage]:
    """Alternating user and assistant turns of varied length, the newest last."""
    rng = random.Random(seed)
    return [
        turn("user" if index % 2 == 0 else "assistant", rng.randint(2, 40), f"m{index}-") for index in range(turns)
    ]


def prompts_turn_by_turn(budget: int, turns: int, seed: int = 0) -> list[tuple[ChatMessage, ...]]:
    """The prompt each user turn gets, the history handed in from the same first message each time."""
    system = turn("system", 8, "s")
    history = grown_conversation(turns, seed)
    counter = WordCounter()
    return [fit_to_budget([system, *history[: end + 1]], budget, counter)[0] for end in range(0, turns, 2)]


@pytest.mark.parametrize("seed", range(5))
def test_consecutive_turns_keep_the_same_first_message_until_a_jump(seed: int) -> None:
    budget = 2000  # a quarter: about ten turns of ~50 tokens
    prompts = prompts_turn_by_turn(budget, 400, seed)
    trimmed = [prompt for prompt in prompts if prompt[1] != prompts[0][1]]
    assert len(trimmed) > 100  # the conversation outgrew the budget long ago
    shared = sum(
        1
        for before, after in zip(prompts, prompts[1:])
        if after[: len(before) - 1] == before[:-1] and after[len(before) - 1] == before[-1]
    )
    # Each turn's prompt starts with the whole of the previous one (its question included),
    # except at the few turns where the history jumps.
    jumps = sum(1 for before, after in zip(prompts, prompts[1:]) if before[1] != after[1])
    assert shared + jumps == len(prompts) - 1
    assert jumps <= len(prompts) // 6, (jumps, len(prompts))


@pytest.mark.parametrize("seed", range(5))
def test_a_jump_leaves_out_about_a_quarter_of_the_budget(seed: int) -> None:
    budget = 2000
    counter = WordCounter()
    largest_turn = counter([turn("user", 40)])
    prompts = prompts_turn_by_turn(budget, 400, seed)
    for before, after in zip(prompts, prompts[1:]):
        if before[1] == after[1]:
            continue
        # What the new prompt no longer holds of the old one's history (the first kept turn moved on).
        # Both cuts lie at most a turn past their grid line, plus an assistant turn skipped.
        start = before.index(after[1])
        left_out = counter(before[1:start])
        assert budget // 4 - 2 * largest_turn <= left_out <= budget // 4 + 2 * largest_turn, (left_out, budget)
    for prompt in prompts:
        assert counter(prompt) <= budget


def test_without_trimming_the_first_message_never_moves() -> None:
    prompts = prompts_turn_by_turn(10**6, 60)
    assert all(len(prompt) == 2 * index + 2 for index, prompt in enumerate(prompts))


# -- a partial reply to continue (issue 14) ----------------------------------------------------------


def test_a_partial_reply_and_its_question_are_both_kept() -> None:
    question, partial = turn("user", 30, "q"), turn("assistant", 30, "p")
    messages = chat(20) + [question, partial]
    counter = WordCounter()
    budget = counter([messages[0], question, partial])  # exactly those fit, nothing more
    kept, dropped = fit_to_budget(messages, budget, counter)
    assert kept == (messages[0], question, partial)
    assert dropped == 20


def test_a_partial_reply_and_its_question_too_long_together() -> None:
    question, partial = turn("user", 30, "q"), turn("assistant", 30, "p")
    messages = chat(4) + [question, partial]
    counter = WordCounter()
    budget = counter([messages[0], question, partial]) - 1
    with pytest.raises(PromptTooLong) as caught:
        fit_to_budget(messages, budget, counter)
    assert caught.value.tokens == budget + 1

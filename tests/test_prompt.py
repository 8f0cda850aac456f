from __future__ import annotations

import math
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


def test_result_is_the_longest_history_that_fits() -> None:
    messages = [turn("user", 5, f"u{index}-") for index in range(30)]
    counter = WordCounter()
    budget = counter(messages[-7:]) + 1  # the newest 7 fit, 8 do not
    kept, dropped = fit_to_budget(messages, budget, counter)
    assert kept == tuple(messages[-7:])
    assert dropped == 23


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
    assert counter.calls <= 3 + math.ceil(math.log2(2000))


def test_empty_chat_is_an_error() -> None:
    with pytest.raises(ValueError):
        fit_to_budget([], 100, WordCounter())


def reference_fit(messages: list[ChatMessage], budget: int, count) -> tuple[tuple[ChatMessage, ...], int] | None:
    """Linear scan: the fewest drops that fit, where a drop may not leave an assistant turn first."""
    head = messages[:1] if messages[0].role == "system" and len(messages) > 1 else []
    older = messages[len(head) : -1]
    for drop in range(len(older) + 1):
        if drop and drop < len(older) and older[drop].role == "assistant":
            continue
        kept = tuple(head + older[drop:] + messages[-1:])
        if count(kept) <= budget:
            return kept, drop
    return None


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
    assert counter.calls <= 4 + math.ceil(math.log2(len(messages) + 1))

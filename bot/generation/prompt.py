"""Fitting a chat into the model's context window by leaving out its oldest turns, and keeping
people's text from reading as a chat template's control tokens.

Pure Python: the worker passes in a `count_tokens` that runs the real chat template, so this
module never needs to know about tokenizers. The worker knows its tokenizer's control tokens
exactly (`bot.worker.template`); a serving engine's are unknown, so `neutralize_markers` breaks
everything that looks like one, for any template.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from bot.core.errors import JobFailed
from bot.core.types import ChatMessage

__all__ = ["PromptTooLong", "TRIM_STEPS", "fit_to_budget", "neutralize_markers", "ZERO_WIDTH_SPACE"]

ZERO_WIDTH_SPACE = "\u200b"
"""Put inside a control-token string of people's text, so no tokenizer reads it as the token."""

# What chat templates' control tokens look like: <|im_start|>, <|eot_id|>, DeepSeek's <｜User｜>
# (any "<|" is broken, whatever follows); tags such as <s>, </s>, <bos>, <start_of_turn>,
# <think>, <tool_call> (and <<SYS>> through its inner <SYS>); bracketed words such as [INST],
# [/INST], [SYSTEM_PROMPT], [gMASK] (one capital letter or underscore at least, so "[here]"
# stays as it is).
_MARKERS = re.compile(
    r"<[|\uff5c]"
    r"|</?[A-Za-z_][\w.:\-]{0,40}>"
    r"|\[/?[A-Za-z0-9]*[A-Z_][A-Za-z0-9_]{0,40}\]"
)


def neutralize_markers(text: str) -> str:
    """`text` with a zero-width space after the first character of everything that looks like a
    chat template's control token, so that no server's tokenizer parses it as one. People still
    read the same text; the model reads it as text."""
    return _MARKERS.sub(lambda match: match[0][0] + ZERO_WIDTH_SPACE + match[0][1:], text)


class PromptTooLong(JobFailed):
    """Even the system prompt plus the newest message do not fit in the model's context window."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"the message is too long for the model: {tokens} tokens, the limit is {budget}")
        self.tokens = tokens
        self.budget = budget


TRIM_STEPS = 4
"""History is cut at grid lines a `budget // TRIM_STEPS` tokens apart (see `fit_to_budget`)."""


def fit_to_budget(
    messages: Sequence[ChatMessage],
    budget: int,
    count_tokens: Callable[[Sequence[ChatMessage]], int],
) -> tuple[tuple[ChatMessage, ...], int]:
    """Leave out the oldest turns until `count_tokens(kept) <= budget`; return (kept, how many were dropped).

    The system message (when it comes first) and the newest message are always kept; when the
    newest is an assistant's partial reply (to be continued), the user message before it (its
    question) is kept too. If those alone are over budget, `PromptTooLong` is raised.

    Cuts are stable, so that consecutive turns share a prompt prefix (the worker's prefix cache
    reuses it): the history is measured in tokens from its first given message, and it is only
    ever cut where a grid line lies, every `budget // TRIM_STEPS` tokens. The cut is the first grid
    line past which everything fits; the history then starts at the first message at or after
    that line. As a conversation grows, turn after turn keeps the same first message until it no
    longer fits, then about a quarter of the budget goes at once. This is stateless: the caller
    hands in the history from the same first message each turn (`prompt_history` keeps it so).

    Counting is a full chat-template tokenization, so both the least that must go and the grid
    cut are found by binary search: O(log n) calls to `count_tokens`.
    """
    if not messages:
        raise ValueError("fit_to_budget needs at least one message")
    messages = tuple(messages)
    head = messages[:1] if messages[0].role == "system" and len(messages) > 1 else ()
    newest_count = 1
    if messages[-1].role == "assistant" and len(messages) - len(head) >= 2 and messages[-2].role == "user":
        newest_count = 2  # a partial reply and its question: both are "the newest"
    older = messages[len(head) : len(messages) - newest_count]
    newest = messages[len(messages) - newest_count :]

    counted: dict[int, int] = {}

    def tokens_without(drop: int) -> int:
        """Tokens of the prompt with the oldest `drop` turns of `older` left out (cached)."""
        if drop not in counted:
            counted[drop] = count_tokens(head + older[drop:] + newest)
        return counted[drop]

    def skip_replies(drop: int) -> int:
        # A history that opens with an assistant turn (its question trimmed away) reads as the bot
        # talking to itself, so once anything is trimmed, trailing assistant turns go too. This
        # only ever drops more, so "more dropped, fewer tokens" still holds for the searches.
        if drop:
            while drop < len(older) and older[drop].role == "assistant":
                drop += 1
        return drop

    def first_at_least(low: int, high: int, accept: Callable[[int], bool]) -> int:
        """The smallest drop in [low, high] that `accept`s, `high` if none below does (monotone)."""
        while low < high:
            middle = (low + high) // 2
            if accept(middle):
                high = middle
            else:
                low = middle + 1
        return high

    total = tokens_without(0)
    if total <= budget:
        return messages, 0
    if not older or tokens_without(skip_replies(len(older))) > budget:
        raise PromptTooLong(tokens_without(len(older)), budget)

    # The least that must go (as few turns as fit)...
    least = first_at_least(1, len(older), lambda drop: tokens_without(skip_replies(drop)) <= budget)
    # ...and the first grid line past the turns before it: the cut lies at or after `least`, so it fits.
    step = max(1, budget // TRIM_STEPS)
    line = ((total - tokens_without(least - 1)) // step + 1) * step
    cut = first_at_least(least, len(older), lambda drop: total - tokens_without(drop) >= line)
    dropped = skip_replies(cut)
    return head + older[dropped:] + newest, dropped

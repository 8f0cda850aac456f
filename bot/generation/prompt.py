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

__all__ = ["PromptTooLong", "fit_to_budget", "neutralize_markers", "ZERO_WIDTH_SPACE"]

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


def fit_to_budget(
    messages: Sequence[ChatMessage],
    budget: int,
    count_tokens: Callable[[Sequence[ChatMessage]], int],
) -> tuple[tuple[ChatMessage, ...], int]:
    """Drop the oldest turns until `count_tokens(kept) <= budget`; return (kept, how many were dropped).

    The system message (when it comes first) and the newest message are always kept; if they alone
    are over budget, `PromptTooLong` is raised. Counting is a full chat-template tokenization, so
    the number of drops is found by binary search: O(log n) calls to `count_tokens`.
    """
    if not messages:
        raise ValueError("fit_to_budget needs at least one message")
    messages = tuple(messages)
    if len(messages) == 1:
        tokens = count_tokens(messages)
        if tokens > budget:
            raise PromptTooLong(tokens, budget)
        return messages, 0

    head = messages[:1] if messages[0].role == "system" else ()
    older = messages[len(head) : -1]
    newest = messages[-1:]

    def keep_after(drop: int) -> tuple[tuple[ChatMessage, ...], int]:
        # A history that opens with an assistant turn (its question trimmed away) reads as the bot
        # talking to itself, so once anything is trimmed, trailing assistant turns go too. This
        # only ever drops more, so "fewer kept, fewer tokens" still holds for the binary search.
        if drop:
            while drop < len(older) and older[drop].role == "assistant":
                drop += 1
        return head + older[drop:] + newest, drop

    everything, _ = keep_after(0)
    if count_tokens(everything) <= budget:
        return everything, 0

    # Smallest drop in [1, len(older)] that fits; len(older) (head + newest only) must fit at all.
    low, high = 1, len(older)
    minimal, minimal_drop = keep_after(high)
    tokens = count_tokens(minimal)
    if tokens > budget:
        raise PromptTooLong(tokens, budget)
    best = (minimal, minimal_drop)
    while low < high:
        middle = (low + high) // 2
        kept, dropped = keep_after(middle)
        if count_tokens(kept) <= budget:
            best, high = (kept, dropped), middle
        else:
            low = middle + 1
    return best

"""Prompt-lookup speculative decoding for a reply decoded alone.

A chat reply often repeats what is already in its prompt or in itself: a quoted line, a name, code
being edited, a list being summarised. The draft is the continuation of the latest earlier
occurrence of the last few tokens (an n-gram lookup, no second model); one forward pass checks all
of it, and every draft token the model agrees with is a step saved. A step reads every weight
once whatever the number of tokens in it, so in bf16 checking 4 drafts costs little more than
decoding 1; the CPU int8 kernel (bot/worker/int8.py) does not reuse weights across rows, so there
a check of 4 costs about 2.3 steps, and a reply whose drafts are mostly wrong stops drafting
(`Row.worth_drafting` in bot/worker/batch.py).

Exact for greedy and sampled replies alike: at each position the model's own choice is drawn
from its distribution (argmax at temperature 0); a draft token is kept only when that choice
equals it, and the first choice that differs is kept as the next token instead. Every token of
the reply is therefore a draw from the same distribution as without speculation (greedy text
is the same up to floating-point differences between one forward of several tokens and several
of one).
"""

from __future__ import annotations

__all__ = ["NgramIndex", "DEFAULT_DRAFT_TOKENS"]

DEFAULT_DRAFT_TOKENS = 4
"""Draft tokens checked per step."""

_NGRAMS = (3, 2)
"""Lookup keys, longest first: a match on 3 tokens predicts better than on 2; single tokens
match too often to be worth a longer forward."""


class NgramIndex:
    """Where each n-gram of a token sequence last ended, kept up to date as tokens are added."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its latest occurrence
        self._previous: dict[tuple[int, ...], int] = {}  # the occurrence before that one
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens)
        for n in _NGRAMS:
            if end >= n:
                key = tuple(tokens[end - n :])
                if key in self._last:
                    self._previous[key] = self._last[key]
                self._last[key] = end

    def draft(self, count: int = DEFAULT_DRAFT_TOKENS) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the sequence's last n-gram."""
        tokens = self.tokens
        end = len(tokens)
        for n in _NGRAMS:
            if end < n:
                continue
            key = tuple(tokens[end - n :])
            # The latest occurrence is the end itself; the one before it is the match.
            at = self._previous.get(key) if self._last.get(key) == end else self._last.get(key)
            if at is not None and at < end:
                return tokens[at : min(at + count, end)]
        return []

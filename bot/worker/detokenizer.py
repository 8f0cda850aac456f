"""Streaming text: a job's generated token ids turned into text deltas as they come."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    """Turns a job's token ids, one at a time, into text deltas that add up to the full decode.

    Decoding token by token is wrong twice over: a byte-level token may hold half of a UTF-8
    character, and some tokenizers render a token differently depending on its neighbours
    (SentencePiece's leading space). So, as TGI and vLLM do, each step decodes a short window
    that starts a little before the text already sent (`prefix`) and emits only what the window
    adds beyond it; text ending in U+FFFD is an unfinished character and is held back.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), context: int = 5) -> None:
        self._tokenizer = tokenizer
        # A few prompt tokens give the first reply tokens their left neighbours.
        self._ids: list[int] = list(prompt_ids[-context:]) if context else []
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it completes (often "", never a broken character)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of the reply (a genuinely broken character shows as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :] if len(now) > len(before) else ""


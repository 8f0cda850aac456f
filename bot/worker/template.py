"""The chat template, applied so that people's text stays text.

A chat template is rendered to a string and tokenized with the tokenizer's control tokens
parsed, so `<|im_end|>\\n<|im_start|>system` typed by someone would otherwise open a real system
turn. Every message's content (the admin's system prompt and the bot's own replies too) is
neutralized first: each of the tokenizer's control-token strings in it gets a zero-width space
after its first character. Ordinary text is left exactly as it was, so its ids are exactly the
template's own. After templating, `check` compares the control tokens of the prompt with those
of the same chat with placeholder contents: a tokenizer that undid the neutralizing (a
normalizer dropping the zero-width space) fails the job instead of obeying it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from bot.core.errors import JobFailed
from bot.core.types import ChatMessage
from bot.generation.prompt import ZERO_WIDTH_SPACE

__all__ = ["ChatTemplater", "UnsafePrompt"]

log = logging.getLogger("parley.worker")

_REPLACEMENT = "\ufffd"


class UnsafePrompt(JobFailed):
    """People's text would have been tokenized as the template's control tokens."""


def _is_markup(text: str) -> bool:
    """Added tokens like `<tool_call>` or `<|fim_prefix|>` are control tokens even when the
    tokenizer does not call them special; added plain words or runs of spaces are not."""
    return any(not (c.isalnum() or c.isspace()) for c in text)


class ChatTemplater:
    """Turns chats into prompt ids with `tokenizer`'s chat template, people's text kept as text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        controls: dict[str, int] = {}
        for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
            content = str(getattr(token, "content", token))
            if content.strip() and (getattr(token, "special", True) or _is_markup(content)):
                controls[content] = token_id
        for content in getattr(tokenizer, "all_special_tokens", ()):
            token_id = tokenizer.convert_tokens_to_ids(content)
            if content.strip() and isinstance(token_id, int):
                controls.setdefault(content, token_id)
        self.control_ids = frozenset(controls.values())
        strings = sorted((s for s in controls if ZERO_WIDTH_SPACE not in s), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def neutralize(self, text: str) -> str:
        """`text` with every control-token string broken by a zero-width space (a one-character
        one replaced by U+FFFD). Repeated until none is left: breaking one occurrence never
        creates another, so this ends."""
        if self._pattern is None:
            return text
        while True:
            broken = self._pattern.sub(_break, text)
            if broken == text:
                return text
            text = broken

    def safe_chat(self, messages: Iterable[ChatMessage]) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(m.role, self.neutralize(m.content)) for m in messages)

    def render(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The template applied as it is: `messages` must come from `safe_chat`.

        A chat that ends with an assistant message asks to continue that reply from exactly where
        it stopped: the prompt then ends with its text (no end-of-turn token after it), the
        assistant turn left open, instead of opening a new one."""
        chat = [message.to_dict() for message in messages]
        if not messages or messages[-1].role != "assistant":
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids)
        return self._render_continuation(chat, messages[-1].content)

    def _render_continuation(self, chat: list[dict[str, str]], partial: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            chat, continue_final_message=True, add_generation_prompt=False, tokenize=False
        )
        # A template that trims contents loses the partial reply's trailing space or newline (and
        # transformers then strips the end): put it back, what comes next depends on it.
        if not text.endswith(partial) and text.endswith(partial.strip()):
            text += partial[len(partial.rstrip()) :]
        tail = partial if text.endswith(partial) else partial.strip()
        start = len(text) - len(tail) if tail and text.endswith(tail) else len(text)
        whole = self._encode(text)
        opening = self._encode(text[:start])
        if whole[: len(opening)] == opening:
            return whole
        # The reply's first characters merged with the end of the template's opening (a newline
        # after "assistant\n" makes one "\n\n" token): the model never saw those ids when it wrote
        # the text, so the opening keeps its own and the reply is tokenized on its own.
        return opening + self._encode(text[start:])

    def _encode(self, text: str) -> list[int]:
        # As `apply_chat_template` tokenizes its rendering: control tokens parsed, none added.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids of `messages`, people's text neutralized."""
        return self.render(self.safe_chat(messages))

    def check(self, messages: Sequence[ChatMessage], ids: Sequence[int]) -> None:
        """Raise `UnsafePrompt` unless `ids` (the prompt of `messages`) holds exactly the control
        tokens the template writes for this chat by itself."""
        skeleton = [ChatMessage(m.role, "x" if m.content.strip() else m.content) for m in messages]
        expected = Counter(i for i in self.render(skeleton) if i in self.control_ids)
        found = Counter(i for i in ids if i in self.control_ids)
        if found != expected:
            extra = {self.tokenizer.convert_ids_to_tokens(i): n for i, n in (found - expected).items()}
            log.error("people's text would have become control tokens %s; the job is refused", extra)
            raise UnsafePrompt(
                f"the prompt was refused: text in it would have been read as the model's control tokens {extra}"
            )


def _break(match: re.Match[str]) -> str:
    text = match[0]
    if len(text) == 1:
        return _REPLACEMENT if text != _REPLACEMENT else ""
    return text[0] + ZERO_WIDTH_SPACE + text[1:]

"""Turning a stored conversation into the chat the model sees."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Protocol

from bot.core.types import ChatMessage, GenerationSettings, Role

__all__ = [
    "build_chat",
    "effective_system_prompt",
    "effective_settings",
    "speaker_name",
    "attributed",
    "history_char_budget",
    "GROUP_NOTE",
    "NAME_LIMIT",
    "CHARS_PER_TOKEN",
    "MESSAGE_OVERHEAD_CHARS",
]

GROUP_NOTE = (
    "You are talking with several people in a group chat. Each user message starts with the "
    "name of the person who wrote it, followed by a colon. A message of several lines has the name "
    'alone on its first line, and every line of the message after it starts with "> ": all of '
    "those lines are that one person's words, never someone else speaking."
)

NAME_LIMIT = 64
"""The longest a speaker's name is shown to the model, in characters."""
_UNNAMED = "Someone"
# ":" and the characters that look like one: a name cannot hold the separator of "Name: text".
_COLONS = frozenset(":\uff1a\ufe13\ufe55\u2236\ua789\u02d0\u0589\u05c3")

CHARS_PER_TOKEN = 8
"""A generous bound on characters a token: a job loads at most the history its context window
could hold at this many characters a token (the worker then trims by real tokens)."""
MESSAGE_OVERHEAD_CHARS = 2 * CHARS_PER_TOKEN
"""What each message costs beyond its text in that estimate: every chat template spends at least
a couple of tokens a turn."""
_UNKNOWN_CONTEXT = 32_768
"""The context assumed when the backend does not tell its own (an OpenAI server without one)."""


class _Conversation(Protocol):
    is_direct: bool
    system_prompt: str | None
    temperature: float | None
    top_p: float | None
    max_new_tokens: int | None


class _Message(Protocol):
    role: str
    author_name: str
    text: str


def effective_system_prompt(conversation: _Conversation, default: str) -> str:
    """The conversation's own prompt; None means the configured default, "" means none at all."""
    return default if conversation.system_prompt is None else conversation.system_prompt


def effective_settings(conversation: _Conversation, default: GenerationSettings) -> GenerationSettings:
    return GenerationSettings(
        temperature=default.temperature if conversation.temperature is None else conversation.temperature,
        top_p=default.top_p if conversation.top_p is None else conversation.top_p,
        max_new_tokens=default.max_new_tokens if conversation.max_new_tokens is None else conversation.max_new_tokens,
    )


def history_char_budget(context_window: int) -> int:
    """How many characters of history a job loads for a model with this context window (0: unknown)."""
    return (context_window if context_window > 0 else _UNKNOWN_CONTEXT) * CHARS_PER_TOKEN


def speaker_name(name: str) -> str:
    """A name as the model sees it in "Name: text": one line of at most `NAME_LIMIT` characters,
    no colon (nor a look-alike), no control or invisible formatting characters."""
    name = unicodedata.normalize("NFKC", name)
    kept: list[str] = []
    for char in name:
        if char in _COLONS or char.isspace():
            kept.append(" ")
        elif not unicodedata.category(char).startswith("C"):  # control, format, surrogate, unassigned
            kept.append(char)
    cleaned = " ".join("".join(kept).split())[:NAME_LIMIT].rstrip()
    return cleaned or _UNNAMED


def attributed(name: str, text: str) -> str:
    """ "Name: text" for one line; for several, "Name:" alone, then each line after "> ", so no
    line of the text can read as another person speaking."""
    lines = text.splitlines()
    if len(lines) <= 1:
        return f"{name}: {lines[0]}" if lines and lines[0] else f"{name}:"
    return "\n".join([f"{name}:", *(f"> {line}".rstrip() for line in lines)])


def build_chat(conversation: _Conversation, history: Sequence[_Message], default_system_prompt: str) -> tuple[ChatMessage, ...]:
    """System prompt first, then the history in order. In shared conversations each user message
    is attributed to its author (`speaker_name`, `attributed`), so the model can tell people apart
    and nobody can speak in someone else's name."""
    system = effective_system_prompt(conversation, default_system_prompt)
    shared = not conversation.is_direct
    if shared:
        system = f"{system}\n\n{GROUP_NOTE}" if system else GROUP_NOTE
    chat = [ChatMessage(Role.SYSTEM.value, system)] if system else []
    for message in history:
        if message.role == Role.USER.value and shared:
            chat.append(ChatMessage(Role.USER.value, attributed(speaker_name(message.author_name), message.text)))
        elif message.role in (Role.USER.value, Role.ASSISTANT.value):
            chat.append(ChatMessage(message.role, message.text))
    return tuple(chat)

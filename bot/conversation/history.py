"""Turning a stored conversation into the chat the model sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from bot.core.types import ChatMessage, GenerationSettings, Role

__all__ = ["build_chat", "effective_system_prompt", "effective_settings", "GROUP_NOTE"]

GROUP_NOTE = (
    "You are talking with several people in a group chat. Each user message starts with the "
    "name of the person who wrote it, followed by a colon."
)


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


def build_chat(conversation: _Conversation, history: Sequence[_Message], default_system_prompt: str) -> tuple[ChatMessage, ...]:
    """System prompt first, then the history in order. In shared conversations each user message
    is attributed to its author, so the model can tell people apart."""
    system = effective_system_prompt(conversation, default_system_prompt)
    shared = not conversation.is_direct
    if shared:
        system = f"{system}\n\n{GROUP_NOTE}" if system else GROUP_NOTE
    chat = [ChatMessage(Role.SYSTEM.value, system)] if system else []
    for message in history:
        if message.role == Role.USER.value and shared:
            chat.append(ChatMessage(Role.USER.value, f"{message.author_name}: {message.text}"))
        elif message.role in (Role.USER.value, Role.ASSISTANT.value):
            chat.append(ChatMessage(message.role, message.text))
    return tuple(chat)

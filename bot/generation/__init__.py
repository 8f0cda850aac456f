"""Generation: the interface the queue asks a model through (`GenerationClient`) and its three
backends (the worker process, the same engine in this process for tests, an OpenAI-compatible
server), the wire protocol to the worker process (`bot.generation.protocol`), and fitting a chat
into a context window (`fit_to_budget`).

Nothing here imports torch or transformers (they live in `bot.worker`). The backends are loaded
on first use of their names, so importing this package does not import the `openai` library.
"""

from __future__ import annotations

import importlib
from typing import Any

from bot.generation.client import (
    BackendHealth,
    GenerationClient,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    TextDelta,
)
from bot.generation.prompt import PromptTooLong, fit_to_budget

__all__ = [
    "GenerationClient",
    "GenerationRequest",
    "TextDelta",
    "GenerationResult",
    "ModelInfo",
    "BackendHealth",
    "PromptTooLong",
    "fit_to_budget",
    "SubprocessGenerationClient",
    "InProcessGenerationClient",
    "OpenAIGenerationClient",
]

_BACKEND_MODULES = {
    "SubprocessGenerationClient": "bot.generation.subprocess_client",
    "InProcessGenerationClient": "bot.generation.inprocess_client",
    "OpenAIGenerationClient": "bot.generation.openai_client",
}


def __getattr__(name: str) -> Any:
    module = _BACKEND_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

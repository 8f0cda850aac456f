"""Choosing the generation backend from `[model] backend`: the one place that knows all three."""

from __future__ import annotations

from bot.core.config import Settings
from bot.generation.client import GenerationClient

__all__ = ["make_generation_client"]


def make_generation_client(settings: Settings, *, in_process: bool = False) -> GenerationClient:
    """By `[model] backend`: an OpenAI-compatible server, or the worker process (in this process
    for tests)."""
    if settings.model.backend == "openai":
        from bot.generation.openai_client import OpenAIGenerationClient

        return OpenAIGenerationClient(settings)
    if in_process:
        from bot.generation.inprocess_client import InProcessGenerationClient

        return InProcessGenerationClient(settings)
    from bot.generation.subprocess_client import SubprocessGenerationClient

    return SubprocessGenerationClient(settings)

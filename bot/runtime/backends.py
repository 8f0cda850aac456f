"""Choosing the generation backend from `[model] backend`: the one place that knows all three."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from bot.core.config import Settings
from bot.core.errors import WorkerStartError
from bot.generation.client import GenerationClient, ModelInfo

if TYPE_CHECKING:
    from bot.generation.inprocess_client import Emit, InProcessEngine

__all__ = ["make_generation_client"]

log = logging.getLogger("parley.generation")


def make_generation_client(settings: Settings, *, in_process: bool = False) -> GenerationClient:
    """By `[model] backend`: an OpenAI-compatible server, or the worker process (in this process
    for tests)."""
    if settings.model.backend == "openai":
        from bot.generation.openai_client import OpenAIGenerationClient

        return OpenAIGenerationClient(settings)
    if in_process:
        from bot.generation.inprocess_client import InProcessGenerationClient

        return InProcessGenerationClient(functools.partial(_load_in_process_engine, settings))
    from bot.generation.subprocess_client import SubprocessGenerationClient

    return SubprocessGenerationClient(settings)


def _load_in_process_engine(settings: Settings, emit: Emit) -> tuple[InProcessEngine, ModelInfo]:
    """The worker's model and engine, loaded in this process (the in-process client's `EngineLoader`)."""
    from bot.worker import Engine, ModelLoadError, load_model  # torch is imported here, and only here

    def progress(stage: str, text: str) -> None:
        log.info("%s: %s", stage, text)

    try:
        loaded = load_model(settings.model, settings.worker, progress)
    except ModelLoadError as exc:
        raise WorkerStartError(str(exc)) from exc
    return Engine(loaded, emit), loaded.info

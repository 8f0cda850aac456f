"""The worker: loading the model, the detokenizer, the decode batch, the engine, and the worker
process (`python -m bot.worker`). The only package of Parley that imports torch, transformers
and bitsandbytes; the bot process reaches it through `bot.generation`'s wire protocol, and only
the runtime's in-process test backend imports it.

Importing this package imports nothing heavy: the names below load their module (and torch) on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Engine",
    "EngineStats",
    "IncrementalDetokenizer",
    "LoadedModel",
    "ModelLoadError",
    "ProgressCallback",
    "EMBEDDED_GGUF",
    "load_model",
    "model_folder",
]

_MODULE_OF = {
    "Engine": "bot.worker.engine",
    "EngineStats": "bot.worker.engine",
    "IncrementalDetokenizer": "bot.worker.detokenizer",
    "LoadedModel": "bot.worker.engine",
    "ModelLoadError": "bot.worker.loading",
    "ProgressCallback": "bot.worker.loading",
    "EMBEDDED_GGUF": "bot.worker.loading",
    "load_model": "bot.worker.loading",
    "model_folder": "bot.worker.loading",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

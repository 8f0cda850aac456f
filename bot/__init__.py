"""Parley's platform-free core. Importing it is cheap: torch is imported by the worker process only."""

from bot.core.errors import *  # noqa: F403
from bot.core.errors import __all__ as _errors
from bot.core.types import *  # noqa: F403
from bot.core.types import __all__ as _types

__all__ = [*_types, *_errors]

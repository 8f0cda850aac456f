"""Parley's platform-free core. Importing it is cheap: torch is imported by the worker process only."""

from .errors import *  # noqa: F403
from .errors import __all__ as _errors
from .types import *  # noqa: F403
from .types import __all__ as _types

__all__ = [*_types, *_errors]

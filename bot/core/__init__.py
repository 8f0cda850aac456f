"""The bottom layer every other part imports: value types (`types`), the exception family
(`errors`), the contracts adapters and the core agree on (`contracts`), typed settings (`config`),
input normalization (`text`) and the task context of log lines (`context`). It imports nothing
else of Parley's."""

from bot.core.contracts import Adapter, Core, Outcome, QueueLimit, Refusal, RefusalKind, ReplyStream, RouteResult
from bot.core.errors import *  # noqa: F403
from bot.core.errors import __all__ as _errors
from bot.core.types import *  # noqa: F403
from bot.core.types import __all__ as _types

__all__ = [
    *_types,
    *_errors,
    "Adapter",
    "Core",
    "Outcome",
    "QueueLimit",
    "Refusal",
    "RefusalKind",
    "ReplyStream",
    "RouteResult",
]

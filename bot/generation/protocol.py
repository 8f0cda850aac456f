"""The wire between the bot process and the worker process: typed messages, one JSON object a line.

Every line is `{"type": <name>, ...fields}`, ASCII-only (non-ASCII text is \\u-escaped, so a line is
never split inside a character). Messages about one job carry its `job_id`.

bot → worker
    configure  model: {ModelSettings fields}, worker: {WorkerSettings fields}, ignore_eos  (first line, once)
    submit     job_id, messages: [{role, content}], settings: {temperature, top_p, max_new_tokens}
    cancel     job_id
    ping       nonce
    shutdown

worker → bot
    progress   stage, text                       (while loading: converting, loading, quantizing, warmup)
    ready      name, quantization, device, dtype, context_window, max_batch, load_seconds  (a ModelInfo)
    fatal      message                           (loading failed; the worker exits)
    started    job_id, prompt_tokens, dropped_messages, batch, batch_size
    deltas     texts: {"<job_id>": text, ...}    (one line per decode step for every job with new text)
    done       job_id, finish_reason, prompt_tokens, completion_tokens, dropped_messages, cached_tokens
                                                 (a GenerationResult)
    error      job_id, message                   (this job failed; the worker carries on)
    pong       nonce

A message that carries one of the public result types (`Ready` a `ModelInfo`, `Done` a
`GenerationResult`) holds the dataclass itself; on the wire its fields sit beside the message's
own, as listed above, encoded and checked from the dataclass's fields like any others.

`decode` checks every field's type and raises `ProtocolError` naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Union

from bot.core.config import ModelSettings, WorkerSettings
from bot.core.errors import GenerationError
from bot.generation.client import GenerationResult, ModelInfo
from bot.core.types import ChatMessage, GenerationSettings

__all__ = [
    "ProtocolError",
    "Configure",
    "Submit",
    "Cancel",
    "Ping",
    "Shutdown",
    "Progress",
    "Ready",
    "Fatal",
    "Started",
    "Deltas",
    "Done",
    "JobError",
    "Pong",
    "Message",
    "ToWorker",
    "FromWorker",
    "encode",
    "decode",
]


class ProtocolError(GenerationError):
    """A line on the wire is not a valid protocol message (a bug, or something else wrote to the pipe)."""


# A message field that holds a dataclass whose fields go on the wire beside the message's own.
_INLINE = "inline"


def _inline(cls: type) -> Any:
    return field(metadata={_INLINE: cls})


# --- bot → worker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Configure:
    """The first message to a fresh worker: what to load and how to run it."""

    TYPE: ClassVar[str] = "configure"
    model: ModelSettings
    worker: WorkerSettings
    ignore_eos: bool = False
    """Benchmarks only: every reply runs to max_new_tokens, ignoring end-of-turn tokens (not a config
    key or a per-job setting, so no user of the bot can reach it)."""


@dataclass(frozen=True, slots=True)
class Submit:
    """Start a job; the worker trims `messages` to fit its context window."""

    TYPE: ClassVar[str] = "submit"
    job_id: int
    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop a job (waiting or running); it ends with a `Done` whose finish_reason is "cancelled"."""

    TYPE: ClassVar[str] = "cancel"
    job_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Ask for a `Pong` with the same nonce (a liveness check that does not touch the model)."""

    TYPE: ClassVar[str] = "ping"
    nonce: int = 0


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop after the current decode step and exit; unfinished jobs get no `Done`."""

    TYPE: ClassVar[str] = "shutdown"


# --- worker → bot -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A loading stage began; `text` is for people (logs, a status line)."""

    TYPE: ClassVar[str] = "progress"
    stage: str
    text: str


@dataclass(frozen=True, slots=True)
class Ready:
    """The model is loaded and the worker takes jobs."""

    TYPE: ClassVar[str] = "ready"
    info: ModelInfo = _inline(ModelInfo)


@dataclass(frozen=True, slots=True)
class Fatal:
    """Loading failed; `message` tells the user which setting to change. The worker exits next."""

    TYPE: ClassVar[str] = "fatal"
    message: str


@dataclass(frozen=True, slots=True)
class Started:
    """A job entered decode batch number `batch` together with `batch_size - 1` others."""

    TYPE: ClassVar[str] = "started"
    job_id: int
    prompt_tokens: int
    dropped_messages: int
    batch: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class Deltas:
    """The new text of every job that produced some in one decode step, by job id."""

    TYPE: ClassVar[str] = "deltas"
    texts: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Done:
    """A job finished: "stop", "length" or "cancelled". No more messages for this job follow."""

    TYPE: ClassVar[str] = "done"
    job_id: int
    result: GenerationResult = _inline(GenerationResult)


@dataclass(frozen=True, slots=True)
class JobError:
    """This job failed (its prompt is too long, its batch ran out of memory...); others go on."""

    TYPE: ClassVar[str] = "error"
    job_id: int
    message: str


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a `Ping`."""

    TYPE: ClassVar[str] = "pong"
    nonce: int = 0


ToWorker = Union[Configure, Submit, Cancel, Ping, Shutdown]
FromWorker = Union[Progress, Ready, Fatal, Started, Deltas, Done, JobError, Pong]
Message = Union[ToWorker, FromWorker]

_MESSAGE_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (Configure, Submit, Cancel, Ping, Shutdown, Progress, Ready, Fatal, Started, Deltas, Done, JobError, Pong)
}


# --- encoding -----------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, (ModelSettings, WorkerSettings)):
        return asdict(value)
    if isinstance(value, GenerationSettings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [item.to_dict() if isinstance(item, ChatMessage) else item for item in value]
    if isinstance(value, Mapping):
        # JSON object keys are strings; job ids come back as ints in `decode`.
        return {str(key): item for key, item in value.items()}
    return value


def _put_fields(payload: dict[str, Any], value: Any) -> None:
    for f in fields(value):
        item = getattr(value, f.name)
        if _INLINE in f.metadata:
            _put_fields(payload, item)
        else:
            payload[f.name] = _to_json(item)


def encode(message: Message) -> bytes:
    """One protocol line, newline included."""
    payload: dict[str, Any] = {"type": message.TYPE}
    _put_fields(payload, message)
    return json.dumps(payload, separators=(",", ":")).encode("ascii") + b"\n"


# --- decoding -----------------------------------------------------------------------------


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{where} must be an integer, not {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false, not {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{where} must be a number, not {value!r}")
    return float(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, not {value!r}")
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object, not {value!r}")
    return value


def _settings_of(cls: type) -> Callable[[Any, str], Any]:
    def parse(value: Any, where: str) -> Any:
        table = _object(value, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ProtocolError(f"{where} has unknown keys {unknown}")
        return cls(**table)

    return parse


def _generation_settings(value: Any, where: str) -> GenerationSettings:
    table = _object(value, where)
    if set(table) != {"temperature", "top_p", "max_new_tokens"}:
        raise ProtocolError(f"{where} must have exactly temperature, top_p and max_new_tokens, not {sorted(table)}")
    return GenerationSettings(
        temperature=_float(table["temperature"], f"{where}.temperature"),
        top_p=_float(table["top_p"], f"{where}.top_p"),
        max_new_tokens=_int(table["max_new_tokens"], f"{where}.max_new_tokens"),
    )


def _chat(value: Any, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list):
        raise ProtocolError(f"{where} must be a list of messages, not {value!r}")
    chat = []
    for index, item in enumerate(value):
        table = _object(item, f"{where}[{index}]")
        if set(table) != {"role", "content"}:
            raise ProtocolError(f"{where}[{index}] must have exactly role and content, not {sorted(table)}")
        chat.append(
            ChatMessage(
                role=_str(table["role"], f"{where}[{index}].role"),
                content=_str(table["content"], f"{where}[{index}].content"),
            )
        )
    return tuple(chat)


def _texts(value: Any, where: str) -> dict[int, str]:
    table = _object(value, where)
    texts = {}
    for key, text in table.items():
        try:
            job_id = int(key)
        except ValueError:
            raise ProtocolError(f"{where} keys must be job ids, not {key!r}") from None
        texts[job_id] = _str(text, f"{where}[{key}]")
    return texts


_FIELD_PARSERS: dict[Any, Callable[[Any, str], Any]] = {
    "int": _int,
    "bool": _bool,
    "float": _float,
    "str": _str,
    "ModelSettings": _settings_of(ModelSettings),
    "WorkerSettings": _settings_of(WorkerSettings),
    "GenerationSettings": _generation_settings,
    "tuple[ChatMessage, ...]": _chat,
    "Mapping[int, str]": _texts,
}


def _wire_names(cls: type) -> frozenset[str]:
    """The keys a message of `cls` may have on the wire (an inlined dataclass's fields included)."""
    names: set[str] = set()
    for f in fields(cls):
        inner = f.metadata.get(_INLINE)
        names |= _wire_names(inner) if inner is not None else {f.name}
    return frozenset(names)


_WIRE_NAMES = {kind: _wire_names(cls) for kind, cls in _MESSAGE_TYPES.items()}


def _parse_fields(cls: type, payload: dict[str, Any], kind: str, shown: object) -> dict[str, Any]:
    values = {}
    for f in fields(cls):
        inner = f.metadata.get(_INLINE)
        if inner is not None:
            values[f.name] = inner(**_parse_fields(inner, payload, kind, shown))
            continue
        if f.name not in payload:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProtocolError(f"{kind} message lacks field {f.name!r}: {shown!r}")
            continue
        values[f.name] = _FIELD_PARSERS[f.type](payload[f.name], f"{kind}.{f.name}")
    return values


def decode(line: bytes | str) -> Message:
    """Parse one protocol line; raise `ProtocolError` saying what is wrong with it."""
    shown = line if len(line) <= 200 else line[:200] + (b"..." if isinstance(line, bytes) else "...")
    try:
        payload = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"not a JSON protocol line ({exc}): {shown!r}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"a protocol line must be a JSON object: {shown!r}")
    kind = payload.pop("type", None)
    cls = _MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}: {shown!r}")
    unknown = sorted(set(payload) - _WIRE_NAMES[kind])
    if unknown:
        raise ProtocolError(f"{kind} message has unknown fields {unknown}: {shown!r}")
    return cls(**_parse_fields(cls, payload, kind, shown))

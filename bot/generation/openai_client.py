"""`[model] backend = "openai"`: generation on an OpenAI-compatible server (vLLM, TGI, llama.cpp's
server, `transformers serve`, or OpenAI itself), through the maintained `openai` library.

Usage::

    client = OpenAIGenerationClient(settings)
    info = await client.start()     # GET /models; BackendStartError naming [openai] base_url if unreachable
    async for item in client.submit(GenerationRequest(job_id, messages, settings.generation)):
        ...                         # TextDelta ..., then exactly one GenerationResult
    await client.stop()

How failures map onto the queue's contract:

* the server answers 408/429/5xx (busy, rate limited, failing): asked again here, with backoff,
  waiting as long as its `Retry-After` says (seconds or an HTTP date), for up to
  `[openai] busy_timeout` seconds; then `BackendBusy` (a `JobFailed`: the job is no suspect, the
  queue keeps its concurrency, and the user reads that the server is overloaded). A busy server
  is not a crashed worker;
* the server cannot be reached (refused, timed out; after `[openai] max_retries` retries with
  backoff), or the stream breaks off mid-reply → `BackendDown`: the queue retries the job up to
  `[worker] max_attempts`, then tells the user;
* any other 4xx (bad request, unknown model, wrong API key...) → `JobFailed` with the server's message.

Prompt length: the worker trims a chat to its context window itself; a server would reject it
instead. So when the context window is known (`[model] context_window` if set, else what the
server's /models entry says, as vLLM's `max_model_len` does) the oldest turns are left out here
with `bot.generation.prompt.fit_to_budget` and a rough counter (4 characters a token, plus a few tokens a
message). When neither tells, the chat is sent whole and the server decides.

People's text is data: before a chat is sent, everything in it that looks like a chat template's
control token (`<|im_start|>`, `</s>`, `[INST]`, `<start_of_turn>` ...) is broken with a zero-width
space (`bot.generation.prompt.neutralize_markers`), so the server's tokenizer reads it as text.

Continuing a reply: a chat that ends with an assistant message (the Continue button, a reply cut
by a crash) is sent as an assistant prefix, with `continue_final_message: true,
add_generation_prompt: false` in the request body, the names vLLM (and SGLang) accept, so the
server leaves that turn open and the model goes on from its last character. A server that does
not know them refuses the request (`transformers serve` up to at least 5.24 does: it rejects
unknown fields with 422 and always adds a generation prompt): the job fails saying the server
cannot continue a reply, rather than the server answering the partial reply with a new one.

The API key is read from the environment variable `[openai] api_key_env` names, and is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import openai

from bot.core.errors import BackendBusy, BackendDown, BackendStartError, JobFailed
from bot.generation.client import (
    BackendHealth,
    GenerationClient,
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    TextDelta,
)
from bot.generation.prompt import fit_to_budget, neutralize_markers
from bot.core.types import ChatMessage

if TYPE_CHECKING:
    from bot.core.config import Settings

__all__ = ["OpenAIGenerationClient", "rough_token_count", "retry_after_seconds"]

log = logging.getLogger("parley.openai")

# Sent when `[openai] api_key_env` is empty: local servers ignore the header, the library needs one.
_NO_KEY = "not-needed"
# Keys of a /models entry that hold the context length, by server (vLLM, LM Studio/OpenRouter, others).
_CONTEXT_KEYS = ("max_model_len", "context_length", "context_window", "max_context_length")
# Statuses the server may answer to a healthy request later (with any 5xx): asked again, not failed.
_RETRYABLE_STATUS = {408, 429}
_BUSY_FIRST_WAIT, _BUSY_MAX_WAIT = 0.5, 30.0  # seconds, doubling, when the server names no wait
_PING_TIMEOUT = 5.0
# Sent with a chat that ends with an assistant message: continue that message, open no new turn.
_CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a response asks for: `Retry-After-Ms`, or `Retry-After` in seconds or as an HTTP
    date (never negative); None when it names none."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def rough_token_count(messages: Sequence[ChatMessage]) -> int:
    """A tokenizer-free estimate: 4 characters a token, plus 4 tokens of template per message."""
    return sum(len(m.content) // 4 + 4 for m in messages) + 2


@dataclass
class _Job:
    queue: asyncio.Queue[TextDelta | GenerationResult | Exception] = field(default_factory=asyncio.Queue)
    pump: asyncio.Task[None] | None = None
    cancelled: bool = False


class OpenAIGenerationClient(GenerationClient):
    """A `GenerationClient` on an OpenAI-compatible chat-completions server (see the module doc)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.openai
        self._client: openai.AsyncOpenAI | None = None
        self._streams: openai.AsyncOpenAI | None = None  # the same, retrying nothing by itself
        self._info: ModelInfo | None = None
        self._jobs: dict[int, _Job] = {}
        self._alive = False
        self._last_error = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def _api_key(self) -> str:
        if not self.config.api_key_env:
            return _NO_KEY
        return self.settings.secret("openai", "api_key_env", self.config.api_key_env)  # ConfigError if unset

    async def start(self) -> ModelInfo:
        base_url = self.config.base_url
        started = time.monotonic()
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=self._api_key(),
            timeout=self.config.timeout,
            max_retries=self.config.max_retries,
        )
        try:
            models = [m async for m in self._client.models.list()]
        except openai.APIConnectionError as exc:
            await self._close_client()
            raise BackendStartError(
                f"the model server at {base_url} cannot be reached ({_describe(exc)}); start it, "
                "or set [openai] base_url to its OpenAI-compatible API root (like http://127.0.0.1:8000/v1)"
            ) from None
        except openai.APIStatusError as exc:
            await self._close_client()
            hint = " (check the API key in the variable [openai] api_key_env names)" if exc.status_code in (401, 403) else ""
            raise BackendStartError(
                f"the model server at {base_url} ([openai] base_url) answered GET /models with "
                f"HTTP {exc.status_code}: {_server_message(exc)}{hint}"
            ) from None
        self._streams = self._client.with_options(max_retries=0)
        names = [m.id for m in models]
        name = self.config.model
        if not name:
            if not names:
                await self._close_client()
                raise BackendStartError(f"the model server at {base_url} ([openai] base_url) lists no models; set [openai] model")
            name = names[0]
        elif names and name not in names:
            log.warning("[openai] model %r is not among the models the server lists (%s)", name, ", ".join(names))
        entry = next((m for m in models if m.id == name), None)
        context = self.settings.model.context_window or _context_of(entry)
        self._info = ModelInfo(
            name=name,
            quantization="",
            device="",
            dtype="",
            served_by=_without_credentials(base_url),
            context_window=context,
            max_batch=self.config.max_concurrent,
            load_seconds=time.monotonic() - started,
        )
        self._alive = True
        self._last_error = ""
        log.info("using model %s on the server at %s (context window: %s)", name, base_url, context or "unknown")
        return self._info

    async def stop(self) -> None:
        for job in list(self._jobs.values()):
            if job.pump is not None:
                job.pump.cancel()
        pumps = [job.pump for job in self._jobs.values() if job.pump is not None]
        await asyncio.gather(*pumps, return_exceptions=True)
        for job in list(self._jobs.values()):
            job.queue.put_nowait(BackendDown("the OpenAI client was stopped"))
        self._jobs.clear()
        self._alive = False
        await self._close_client()

    async def _close_client(self) -> None:
        self._streams = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> AsyncIterator[TextDelta | GenerationResult]:
        if self._client is None or self._info is None:
            raise BackendDown("the OpenAI client is not started")
        job_id = request.job_id
        if job_id in self._jobs:
            raise JobFailed(f"job {job_id} is already running")
        messages, dropped = self._fit(request)
        # The server applies its own template to what it gets: people's text (the admin's system
        # prompt too) must not carry anything its tokenizer could read as a control token.
        messages = tuple(ChatMessage(m.role, neutralize_markers(m.content)) for m in messages)
        job = _Job()
        self._jobs[job_id] = job
        job.pump = asyncio.create_task(self._pump(job, request, messages, dropped), name=f"parley-openai-{job_id}")
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if self._jobs.get(job_id) is job:
                del self._jobs[job_id]
            if not job.pump.done():  # the caller walked away: close the stream
                job.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await job.pump

    async def cancel(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.pump is None or job.pump.done():
            return
        job.cancelled = True
        job.pump.cancel()  # closes the HTTP stream; the pump then reports "cancelled"

    def _fit(self, request: GenerationRequest) -> tuple[tuple[ChatMessage, ...], int]:
        context = self._info.context_window if self._info else 0
        if not context:
            return tuple(request.messages), 0
        budget = context - request.settings.max_new_tokens
        if budget <= 0:
            raise JobFailed(
                f"max_new_tokens = {request.settings.max_new_tokens} leaves no room for the prompt in the model's "
                f"context window of {context} tokens"
            )
        return fit_to_budget(request.messages, budget, rough_token_count)

    async def _pump(
        self, job: _Job, request: GenerationRequest, messages: tuple[ChatMessage, ...], dropped: int
    ) -> None:
        """Open the stream and feed `job.queue`: deltas, then a result or an exception."""
        assert self._client is not None and self._info is not None
        settings = request.settings
        stream = None
        finish: str | None = None
        prompt_tokens = completion_tokens = 0
        try:
            try:
                stream = await self._open_stream(request.job_id, messages, settings)
                self._mark_alive()
                async for chunk in stream:
                    if chunk.usage is not None:
                        prompt_tokens = chunk.usage.prompt_tokens or 0
                        completion_tokens = chunk.usage.completion_tokens or 0
                    for choice in chunk.choices:
                        if choice.delta is not None and choice.delta.content:
                            job.queue.put_nowait(TextDelta(choice.delta.content))
                        if choice.finish_reason:
                            finish = choice.finish_reason
            finally:
                if stream is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(stream.close())
        except asyncio.CancelledError:
            if job.cancelled:
                job.queue.put_nowait(GenerationResult("cancelled", prompt_tokens, completion_tokens, dropped))
            raise
        except BackendBusy as exc:
            job.queue.put_nowait(exc)
            return
        except openai.APIStatusError as exc:
            job.queue.put_nowait(self._status_error(exc, continuing=_continues(messages)))
            return
        except (openai.APIConnectionError, httpx.TransportError) as exc:
            what = "broke off mid-reply" if stream is not None else "could not be made"
            job.queue.put_nowait(self._dead(f"the connection to the model server {what}: {_describe(exc)}"))
            return
        except openai.APIError as exc:  # an error event inside the stream
            job.queue.put_nowait(JobFailed(f"the model server reported an error: {_server_message(exc)}"))
            return
        except Exception as exc:  # a bug here must end the job, not leave its caller waiting
            log.exception("job %d: the OpenAI-compatible stream failed unexpectedly", request.job_id)
            job.queue.put_nowait(JobFailed(f"internal error: {type(exc).__name__}"))
            return
        if finish is None:
            job.queue.put_nowait(self._dead("the model server ended the stream before the reply was complete"))
            return
        self._mark_alive()
        reason = "length" if finish == "length" else "stop"
        job.queue.put_nowait(GenerationResult(reason, prompt_tokens, completion_tokens, dropped))

    async def _open_stream(self, job_id: int, messages: tuple[ChatMessage, ...], settings: Any) -> Any:
        """Start the completion stream. A busy or failing server (408, 429, 5xx) is asked again
        after the wait it names (else a doubling backoff) until `[openai] busy_timeout` would be
        passed, then `BackendBusy`; a connection that cannot be made is tried `max_retries` more
        times, then left to `_pump` (`BackendDown`)."""
        assert self._streams is not None and self._info is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.busy_timeout
        backoff = _BUSY_FIRST_WAIT
        connection_failures = 0
        while True:
            try:
                return await self._streams.chat.completions.create(
                    model=self._info.name,
                    messages=[m.to_dict() for m in messages],  # type: ignore[misc]
                    stream=True,
                    stream_options={"include_usage": True},
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    max_tokens=settings.max_new_tokens,
                    extra_body=_CONTINUE_FINAL_MESSAGE if _continues(messages) else None,
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status not in _RETRYABLE_STATUS and status < 500:
                    raise
                self._mark_alive()  # it answered: up, but busy
                asked = retry_after_seconds(exc.response.headers)
                wait = asked if asked is not None else backoff * (0.75 + random.random() / 2)
                backoff = min(backoff * 2, _BUSY_MAX_WAIT)
                reason = f"HTTP {status}: {_server_message(exc)}"
                if loop.time() + wait > deadline:
                    log.warning(
                        "job %d: the model server stayed busy for [openai] busy_timeout = %g s (%s)",
                        job_id, self.config.busy_timeout, reason,
                    )
                    raise BackendBusy(
                        f"the model server stayed busy or failing for {self.config.busy_timeout:g} s "
                        f"([openai] busy_timeout): {reason}"
                    ) from None
                log.info("job %d: the model server is busy (%s); asking again in %.1f s", job_id, reason, wait)
                await asyncio.sleep(wait)
            except openai.APIConnectionError:
                connection_failures += 1
                if connection_failures > self.config.max_retries:
                    raise
                await asyncio.sleep(min(_BUSY_FIRST_WAIT * 2 ** (connection_failures - 1), 8.0))

    def _status_error(self, exc: openai.APIStatusError, *, continuing: bool = False) -> Exception:
        status = exc.status_code
        if status in _RETRYABLE_STATUS or status >= 500:
            return self._dead(f"the model server answered HTTP {status}: {_server_message(exc)}")
        self._mark_alive()  # it answered: it is up, this request is what it refused
        if continuing:
            return JobFailed(
                f"the model server refused to continue the reply (HTTP {status}; it may not support "
                f"continue_final_message): {_server_message(exc)}"
            )
        return JobFailed(f"the model server refused the request (HTTP {status}): {_server_message(exc)}")

    def _dead(self, reason: str) -> BackendDown:
        self._alive = False
        self._last_error = reason
        log.warning("%s ([openai] base_url = %s)", reason, self.config.base_url)
        return BackendDown(reason)

    def _mark_alive(self) -> None:
        self._alive = True
        self._last_error = ""

    # -- state -----------------------------------------------------------------------------------

    async def health(self) -> BackendHealth:
        """Pings GET /models (one try, a few seconds) so `/status` tells whether the server is up now."""
        if self._client is not None:
            try:
                await self._client.with_options(timeout=min(_PING_TIMEOUT, self.config.timeout), max_retries=0).models.list()
                self._mark_alive()
            except openai.APIError as exc:
                self._alive = False
                self._last_error = f"ping failed: {_describe(exc)}"
        return BackendHealth(
            alive=self._alive,
            model=self._info,
            running_jobs=len(self._jobs),
            extra={"backend": "openai", "base_url": self.config.base_url, "last_error": self._last_error},
        )

    @property
    def model_info(self) -> ModelInfo | None:
        return self._info


def _continues(messages: Sequence[ChatMessage]) -> bool:
    """Whether the chat asks to continue its last message, a partial reply."""
    return bool(messages) and messages[-1].role == "assistant"


def _context_of(entry: Any) -> int:
    """The context length a /models entry states (extra fields kept by the library), or 0."""
    if entry is None:
        return 0
    extra = getattr(entry, "model_extra", None) or {}
    for key in _CONTEXT_KEYS:
        value = extra.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _server_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if body.get("detail"):
            return str(body["detail"])
    return exc.message


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc).rstrip(".")
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


def _without_credentials(url: str) -> str:
    """`url` as shown to users: any user:password@ part removed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"

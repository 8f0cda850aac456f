"""A busy or failing model server (408, 429, 5xx) is waited for, not taken for a dead worker.

A small OpenAI-compatible server of our own on 127.0.0.1 (aiohttp, streaming SSE chat
completions) answers 429 with `Retry-After` in seconds, then 503 with `Retry-After` as an HTTP
date, for a while, then streams. Every job is answered once, none is retried as a suspect
(`attempts` stays 0, the queue keeps its concurrency), and the waits are what the server asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from email.utils import formatdate

import pytest
from aiohttp import web

from adapters.fake import FakeAdapter
from bot.conversation import messages
from bot.core.contracts import Outcome
from bot.core.errors import BackendBusy, JobFailed
from bot.core.types import JobStatus
from bot.generation.client import GenerationRequest, GenerationResult
from bot.generation.openai_client import OpenAIGenerationClient, retry_after_seconds
from bot.core.types import ChatMessage, GenerationSettings
from bot.runtime.app import ParleyApp
from tests.support import jobs_of, make_settings


class BusyServer:
    """`/v1/models` and streaming `/v1/chat/completions`; the first `busy` chat requests are
    refused (429 with Retry-After seconds, then 503 with Retry-After as an HTTP date)."""

    def __init__(self, busy: int, *, retry_after: float = 1.0) -> None:
        self.busy = busy
        self.retry_after = retry_after
        self.requests: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
        """Per prompt: (arrival, status answered, seconds asked to wait)."""
        self.streaming = 0
        self.most_streaming = 0
        self._count = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> BusyServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 4096}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        arrival = time.monotonic()
        self._count += 1
        if self._count <= self.busy:
            if self._count % 2:
                self.requests[prompt].append((arrival, 429, self.retry_after))
                return web.json_response(
                    {"error": {"message": "rate limited: too many requests"}},
                    status=429, headers={"Retry-After": f"{self.retry_after:g}"},
                )
            # An HTTP date has whole seconds: ask for the next whole second at least one ahead.
            when = int(time.time()) + 2
            asked = when - time.time()
            self.requests[prompt].append((arrival, 503, asked))
            return web.json_response(
                {"error": {"message": "the engine is overloaded"}}, status=503, headers={"Retry-After": formatdate(when, usegmt=True)}
            )
        self.requests[prompt].append((arrival, 200, 0.0))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.streaming += 1
        self.most_streaming = max(self.most_streaming, self.streaming)
        try:
            for word in ("echo: ", prompt):
                await asyncio.sleep(0.2)
                chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            last = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        finally:
            self.streaming -= 1
        return response


def busy_settings(model_dir, tmp_path, base_url, **openai):
    section = {"base_url": base_url, "max_retries": 0, "timeout": 30.0, "max_concurrent": 8, **openai}
    return make_settings(model_dir, tmp_path, model={"backend": "openai"}, openai=section)


def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    in_four = retry_after_seconds({"retry-after": formatdate(time.time() + 4, usegmt=True)})
    assert in_four is not None and 2.9 <= in_four <= 4.1
    assert retry_after_seconds({"retry-after": formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


async def test_a_busy_server_is_waited_for_and_every_job_answered_once(tiny_model_dir, tmp_path):
    conversations = 6
    async with BusyServer(busy=10, retry_after=1.0) as server:
        settings = busy_settings(tiny_model_dir, tmp_path, server.base_url, busy_timeout=30.0)
        fake = FakeAdapter()
        async with ParleyApp(settings, [fake]) as app:
            results = [await fake.say(f"question {i}", direct=True, chat=f"c{i}") for i in range(conversations)]
            assert all(r.outcome is Outcome.QUEUED for r in results)
            statuses = await asyncio.wait_for(asyncio.gather(*(app.router.wait_for(r.job_id) for r in results)), 60)
            assert statuses == [JobStatus.DONE.value] * conversations
            for i in range(conversations):
                [reply] = fake.replies_in(f"c{i}")
                assert reply.failed is None and reply.text == f"echo: question {i}"
            jobs = [job for r in results for job in await jobs_of(app, (await app.repo.get_job(r.job_id)).conversation_id)]
            assert [job.attempts for job in jobs] == [0] * conversations  # no job taken for a worker killer
    assert server.most_streaming > 1  # the queue kept its concurrency
    refused = 0
    for prompt, calls in server.requests.items():
        assert calls[-1][1] == 200 and [c[1] for c in calls].count(200) == 1, prompt
        for (arrival, status, asked), (next_arrival, _, _) in zip(calls, calls[1:]):
            refused += 1
            waited = next_arrival - arrival
            assert asked - 0.05 <= waited <= asked + 0.6, (prompt, status, asked, waited)
    assert refused == 10


async def test_a_server_busy_past_the_limit_fails_the_job_saying_so(tiny_model_dir, tmp_path):
    async with BusyServer(busy=10_000, retry_after=0.3) as server:
        settings = busy_settings(tiny_model_dir, tmp_path, server.base_url, busy_timeout=1.0)
        async with OpenAIGenerationClient(settings) as client:
            request = GenerationRequest(1, (ChatMessage("user", "hi"),), GenerationSettings(max_new_tokens=8))
            with pytest.raises(BackendBusy, match="HTTP (429|503)") as caught:
                async for item in client.submit(request):
                    assert not isinstance(item, GenerationResult)
            assert isinstance(caught.value, JobFailed)
        fake = FakeAdapter()
        async with ParleyApp(settings, [fake]) as app:
            result = await fake.say("anyone there?", direct=True, chat="dm")
            assert await asyncio.wait_for(app.router.wait_for(result.job_id), 30) == JobStatus.FAILED.value
            [reply] = fake.replies_in("dm")
            assert reply.failed == messages.BACKEND_BUSY
            assert "overloaded" in messages.BACKEND_BUSY
            job = await app.repo.get_job(result.job_id)
            assert job.attempts == 0 and "HTTP" in (job.error or "")

"""Metrics and probes: Parley with `[metrics] enabled`, replies through FakeAdapter and the real
worker process (tiny model), the endpoint scraped over HTTP and parsed by prometheus_client."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.fake import FakeAdapter
from bot.core.contracts import Outcome
from bot.core.types import JobStatus
from bot.generation.client import GenerationClient, GenerationResult
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from tests.support import make_settings


class Spy(GenerationClient):
    """The real client, noting each job's GenerationResult (to check the token counter against)."""

    def __init__(self, inner: GenerationClient) -> None:
        self.inner, self.results = inner, []

    async def start(self):  # noqa: ANN201
        return await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def cancel(self, job_id: int) -> None:
        await self.inner.cancel(job_id)

    async def health(self):  # noqa: ANN201
        return await self.inner.health()

    @property
    def model_info(self):  # noqa: ANN201
        return self.inner.model_info

    async def submit(self, request):  # noqa: ANN001, ANN201
        async for event in self.inner.submit(request):
            if isinstance(event, GenerationResult):
                self.results.append(event)
            yield event


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def probe(session: aiohttp.ClientSession, url: str, path: str) -> tuple[int, dict]:
    async with session.get(f"{url}{path}") as response:
        return response.status, await response.json()


@pytest.fixture
async def metered(tiny_model_dir, tmp_path):
    settings = make_settings(tiny_model_dir, tmp_path, metrics={"enabled": True, "port": 0})
    fake = FakeAdapter()
    spy = Spy(make_generation_client(settings))  # the worker process
    async with ParleyApp(settings, [fake], client=spy) as app, aiohttp.ClientSession() as session:
        yield fake, app, spy, session


async def test_metrics_move_by_what_was_sent_and_readyz_follows_the_worker(metered):
    fake, app, spy, session = metered
    url = app.status_server.url
    assert (await probe(session, url, "/healthz")) == (200, {"status": "ok"})
    before = await scrape(session, url)
    assert before[("parley_queue_depth", ())] == 0
    assert before[("parley_reply_seconds_count", ())] == 0
    assert before[("parley_jobs_total", (("outcome", "done"),))] == 0
    assert before[("parley_worker_restarts_total", ())] == 0
    assert ("parley_model_memory_bytes", ()) not in before  # the worker does not report it (yet)

    jobs = []
    for index in range(3):
        result = await fake.say(f"question {index}", user=f"user{index}", chat=f"dm{index}", direct=True)
        assert result.outcome is Outcome.QUEUED
        jobs.append(result.job_id)
    for job_id in jobs:
        assert await app.router.wait_for(job_id) == JobStatus.DONE.value
    await fake.say("/help", user="user0", chat="dm0", direct=True)
    await fake.say("x" * 9000, user="user1", chat="dm1", direct=True)  # over max_input_chars
    await fake.say("just context", user="user2", addressed=False)

    after = await scrape(session, url)
    tokens = sum(r.completion_tokens for r in spy.results)
    assert len(spy.results) == 3 and tokens > 0
    assert after[("parley_generated_tokens_total", ())] == tokens
    for histogram in ("parley_time_to_first_token_seconds", "parley_reply_seconds", "parley_queue_wait_seconds"):
        assert after[(f"{histogram}_count", ())] == 3, histogram
        assert after[(f"{histogram}_bucket", (("le", "+Inf"),))] == 3, histogram
        assert after[(f"{histogram}_sum", ())] > 0, histogram
    assert after[("parley_tokens_per_second_count", ())] == sum(1 for r in spy.results if r.completion_tokens)
    assert after[("parley_jobs_total", (("outcome", "done"),))] == 3
    assert after[("parley_jobs_total", (("outcome", "failed"),))] == 0
    assert after[("parley_queue_depth", ())] == 0
    messages = {labels: value for (name, labels), value in after.items() if name == "parley_messages_total"}
    assert messages == {
        (("outcome", "queued"), ("platform", "fake")): 3,
        (("outcome", "command"), ("platform", "fake")): 1,
        (("outcome", "refused"), ("platform", "fake")): 1,
        (("outcome", "recorded"), ("platform", "fake")): 1,
    }
    assert after[("parley_refusals_total", (("platform", "fake"), ("reason", "too_long")))] == 1
    assert after[("parley_isolated_jobs_total", ())] == 0
    # No label names a user or a conversation.
    assert not any(key in ("user", "conversation", "chat", "author") for _, labels in after for key, _ in labels)

    status, body = await probe(session, url, "/readyz")
    assert status == 200 and body["checks"] == {"database": "ok", "backend": "ok", "fake": "ok"}
    pid = (await app.client.health()).pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        status, body = await probe(session, url, "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.01)
    assert status == 503 and body["reason"].startswith("backend: not ready"), body
    for _ in range(600):
        status, body = await probe(session, url, "/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200, body
    assert (await app.client.health()).pid != pid
    assert (await scrape(session, url))[("parley_worker_restarts_total", ())] == 1
    fake.online = False
    status, body = await probe(session, url, "/readyz")
    assert status == 503 and body["reason"] == "fake: not connected"


async def test_each_app_has_its_own_registry_and_metrics_are_off_by_default(tiny_model_dir, tmp_path):
    from bot.runtime.metrics import ParleyMetrics

    first, second = ParleyMetrics(), ParleyMetrics()
    first.messages.labels("fake", "queued").inc()
    assert first.registry is not second.registry
    assert second.registry.get_sample_value("parley_messages_total", {"platform": "fake", "outcome": "queued"}) is None
    settings = make_settings(tiny_model_dir, tmp_path)
    assert not settings.metrics.enabled and settings.metrics.port == 9464 and settings.metrics.host == "127.0.0.1"
    assert ParleyApp(settings, [FakeAdapter()], client=make_generation_client(settings, in_process=True)).metrics is None

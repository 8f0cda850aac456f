"""`[model] backend = "openai"` against a real OpenAI-compatible server: `transformers serve`
on 127.0.0.1, serving the tiny random Llama offline (HF_HUB_OFFLINE=1), with the real queue,
router, storage and FakeAdapter in front of it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from adapters.fake import FakeAdapter
from bot.core.contracts import Outcome
from bot.runtime.app import ParleyApp
from bot.core.errors import BackendStartError, JobFailed
from bot.generation.client import (
    GenerationRequest,
    GenerationResult,
    TextDelta,
)
from bot.runtime.backends import make_generation_client
from bot.generation.openai_client import OpenAIGenerationClient, rough_token_count
from bot.core.types import ChatMessage, GenerationSettings, JobStatus
from tests.support import jobs_of, make_settings

SERVER_START_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`transformers serve <model folder>` in its own process group, on a free loopback port."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        executable = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(executable), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
             "--device", "cpu", "--dtype", "float32", "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"transformers serve did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield srv
    srv.stop()


def openai_settings(tiny_model_dir, tmp_path, base_url, **sections):
    sections.setdefault("openai", {})
    sections["openai"] = {"base_url": base_url, "max_retries": 0, "timeout": 30.0, **sections["openai"]}
    return make_settings(tiny_model_dir, tmp_path, model={"backend": "openai"}, **sections)


async def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- without a server ------------------------------------------------------------------------------


async def test_unreachable_server_at_start_names_the_base_url_setting(tiny_model_dir, tmp_path):
    settings = openai_settings(tiny_model_dir, tmp_path, f"http://127.0.0.1:{_free_port()}/v1")
    client = make_generation_client(settings)
    assert isinstance(client, OpenAIGenerationClient)
    with pytest.raises(BackendStartError, match=r"\[openai\] base_url"):
        await client.start()
    # And the whole app refuses to start the same way, closing what it opened.
    with pytest.raises(BackendStartError, match=r"\[openai\] base_url"):
        async with ParleyApp(settings, [FakeAdapter()]):
            pass


async def test_api_key_comes_from_the_named_variable_and_is_required(tiny_model_dir, tmp_path, monkeypatch):
    from bot.core.errors import ConfigError

    monkeypatch.delenv("PARLEY_TEST_OPENAI_KEY", raising=False)
    settings = openai_settings(tiny_model_dir, tmp_path, "http://127.0.0.1:9/v1", openai={"api_key_env": "PARLEY_TEST_OPENAI_KEY"})
    with pytest.raises(ConfigError, match="PARLEY_TEST_OPENAI_KEY"):
        await OpenAIGenerationClient(settings).start()


def test_rough_counter_trims_the_oldest_turns_to_the_server_context():
    from bot.core.config import Settings
    from bot.generation.client import ModelInfo

    client = OpenAIGenerationClient(Settings())
    client._info = ModelInfo("m", "", "", "", context_window=100, max_batch=1, served_by="http://server/v1")
    chat = (ChatMessage("system", "sys"),) + tuple(ChatMessage("user" if i % 2 == 0 else "assistant", "x" * 80) for i in range(9))
    kept, dropped = client._fit(GenerationRequest(1, chat, GenerationSettings(max_new_tokens=20)))
    assert dropped > 0 and kept[0].role == "system" and kept[-1] == chat[-1]
    assert rough_token_count(kept) <= 80
    client._info = ModelInfo("m", "", "", "", context_window=0, max_batch=1, served_by="http://server/v1")
    assert client._fit(GenerationRequest(1, chat, GenerationSettings(max_new_tokens=20))) == (chat, 0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, "JobFailed"), (404, "JobFailed"), (429, "BackendBusy"), (408, "BackendBusy"), (503, "BackendBusy")],
)
async def test_http_errors_map_to_job_failed_or_backend_busy(tiny_model_dir, tmp_path, status, expected):
    """transformers serve answers malformed requests with a bare 500, so a small aiohttp server
    on 127.0.0.1 stands in for the error statuses other servers (vLLM, OpenAI) send."""
    from aiohttp import web

    from bot.core import errors

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 512}]})

    async def chat(request):
        return web.json_response({"error": {"message": f"the server says no ({status})"}}, status=status)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        # A busy or failing server is asked again for up to busy_timeout, then BackendBusy (no
        # BackendDown: that would make the job a suspect that runs alone); tests/test_openai_busy.py
        # covers the waiting.
        settings = openai_settings(tiny_model_dir, tmp_path, f"http://127.0.0.1:{port}/v1", openai={"busy_timeout": 0.2})
        async with OpenAIGenerationClient(settings) as client:
            assert client.model_info.context_window == 512  # vLLM's max_model_len
            request = GenerationRequest(1, (ChatMessage("user", "hi"),), GenerationSettings(max_new_tokens=8))
            with pytest.raises(getattr(errors, expected), match=f"the server says no \\({status}\\)"):
                async for _ in client.submit(request):
                    pass
            assert (await client.health()).running_jobs == 0
    finally:
        await runner.cleanup()


async def test_a_partial_reply_is_sent_as_an_assistant_prefix_to_continue(tiny_model_dir, tmp_path):
    """A chat ending with an assistant message asks the server (vLLM's parameter names) to
    continue it; a server that refuses gets a job failure that says so. A small aiohttp server on
    127.0.0.1 records the requests and streams a tiny reply."""
    import json

    from aiohttp import web

    bodies: list[dict] = []

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 512}]})

    async def chat(request):
        body = await request.json()
        bodies.append(body)
        if body["messages"][-1]["content"] == "refuse":
            return web.json_response({"error": {"message": "Unexpected fields in the request"}}, status=422)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in (({"role": "assistant", "content": "world"}, None), ({}, "stop")):
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        settings = openai_settings(tiny_model_dir, tmp_path, f"http://127.0.0.1:{port}/v1")
        async with OpenAIGenerationClient(settings) as client:
            question = ChatMessage("user", "Say hello world.")
            history = tuple(ChatMessage("user" if i % 2 == 0 else "assistant", "x" * 400) for i in range(6))
            continuing = history + (question, ChatMessage("assistant", "Hello "))
            items = [item async for item in client.submit(GenerationRequest(1, continuing, GenerationSettings(max_new_tokens=200)))]
            assert [i.text for i in items if isinstance(i, TextDelta)] == ["world"]
            assert items[-1].finish_reason == "stop"
            sent = bodies[-1]
            assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
            # The question and the partial reply are both kept whole (older turns trimmed to fit 512 tokens).
            assert sent["messages"][-2:] == [{"role": "user", "content": "Say hello world."}, {"role": "assistant", "content": "Hello "}]
            assert items[-1].dropped_messages > 0
            # An ordinary chat asks for a new reply, as before.
            [_ async for _ in client.submit(GenerationRequest(2, (question,), GenerationSettings(max_new_tokens=8)))]
            assert "continue_final_message" not in bodies[-1] and "add_generation_prompt" not in bodies[-1]
            refused = (question, ChatMessage("assistant", "refuse"))
            with pytest.raises(JobFailed, match="refused to continue the reply.*continue_final_message"):
                async for _ in client.submit(GenerationRequest(3, refused, GenerationSettings(max_new_tokens=8))):
                    pass
    finally:
        await runner.cleanup()


# -- against `transformers serve` ------------------------------------------------------------------


@pytest.mark.slow
async def test_client_streams_from_the_server_and_reports_the_model(server, tiny_model_dir, tmp_path):
    settings = openai_settings(tiny_model_dir, tmp_path, server.base_url, openai={"max_concurrent": 3})
    async with OpenAIGenerationClient(settings) as client:
        info = client.model_info
        assert info.name == str(tiny_model_dir)  # the first (only) model the server lists
        assert (info.served_by, info.quantization, info.device, info.max_batch) == (server.base_url, "", "", 3)
        items = [
            item
            async for item in client.submit(
                GenerationRequest(1, (ChatMessage("user", "hi"),), GenerationSettings(temperature=0.0, max_new_tokens=5))
            )
        ]
        deltas, result = items[:-1], items[-1]
        assert deltas and all(isinstance(d, TextDelta) for d in deltas)
        assert isinstance(result, GenerationResult) and result.finish_reason == "length"
        assert result.completion_tokens == 5 and result.prompt_tokens > 0
        health = await client.health()
        assert health.alive and health.running_jobs == 0 and health.model == info


@pytest.mark.slow
async def test_a_streamed_reply_through_the_queue_is_stored(server, tiny_model_dir, tmp_path):
    settings = openai_settings(tiny_model_dir, tmp_path, server.base_url)
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake]) as app:
        result = await fake.say("Hello there", direct=True, chat="dm")
        assert result.outcome is Outcome.QUEUED, result
        assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
        [reply] = fake.replies_in("dm")
        assert reply.failed is None and reply.text and reply.updates  # streamed, then finished
        conversation = await app.repo.get_or_create_conversation(reply.conversation, is_direct=True)
        history = await app.repo.history(conversation.id)
        assert [(m.role, m.text) for m in history] == [("user", "Hello there"), ("assistant", reply.text)]
        status = await fake.say("/status", direct=True, chat="dm")
        assert str(tiny_model_dir) in status.reply and f"served by {server.base_url}" in status.reply


@pytest.mark.slow
async def test_reset_while_streaming_cancels_the_reply(server, tiny_model_dir, tmp_path):
    settings = openai_settings(tiny_model_dir, tmp_path, server.base_url, generation={"max_new_tokens": 4096})
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake]) as app:
        result = await fake.say("tell me a long story", direct=True, chat="dm")
        await wait_until(lambda: fake.replies and fake.replies[0].updates)
        reset = await fake.say("/reset", direct=True, chat="dm")
        assert reset.outcome is Outcome.COMMAND
        assert await asyncio.wait_for(app.router.wait_for(result.job_id), 10) == JobStatus.CANCELLED.value
        [reply] = fake.replies_in("dm")
        assert (reply.text or "").endswith("[stopped]") or reply.failed == "[stopped]"


@pytest.mark.slow
async def test_client_cancel_ends_the_stream_with_cancelled(server, tiny_model_dir, tmp_path):
    settings = openai_settings(tiny_model_dir, tmp_path, server.base_url)
    async with OpenAIGenerationClient(settings) as client:
        request = GenerationRequest(7, (ChatMessage("user", "go on"),), GenerationSettings(max_new_tokens=4096))
        items = []
        async for item in client.submit(request):
            items.append(item)
            if len(items) == 2:
                await client.cancel(7)
        assert isinstance(items[-1], GenerationResult) and items[-1].finish_reason == "cancelled"
        assert len(items) < 100  # it stopped long before 4096 tokens
        assert (await client.health()).running_jobs == 0


@pytest.mark.slow
async def test_server_killed_mid_stream_fails_the_job_clearly_and_the_bot_lives_on(tiny_model_dir, tmp_path):
    server = Server(tiny_model_dir, tmp_path / "serve.log")
    try:
        settings = openai_settings(
            tiny_model_dir, tmp_path, server.base_url, generation={"max_new_tokens": 4096}, worker={"max_attempts": 2}
        )
        fake = FakeAdapter()
        async with ParleyApp(settings, [fake]) as app:
            result = await fake.say("tell me a long story", direct=True, chat="dm")
            await wait_until(lambda: fake.replies and fake.replies[0].updates)
            server.kill()
            assert await asyncio.wait_for(app.router.wait_for(result.job_id), 30) == JobStatus.FAILED.value
            [reply] = fake.replies_in("dm")
            assert reply.failed and "2 times" in reply.failed
            conversation = await app.repo.get_or_create_conversation(reply.conversation, is_direct=True)
            [job] = await jobs_of(app, conversation.id)
            assert job.attempts == 2 and "backend down" in (job.error or "")
            # The bot still answers commands, and says the server is down.
            health = await app.client.health()
            assert not health.alive and "ping failed" in health.extra["last_error"]
            status = await fake.say("/status", direct=True, chat="dm")
            assert status.outcome is Outcome.COMMAND and status.reply
    finally:
        server.stop()


@pytest.mark.slow
async def test_the_embedded_model_through_transformers_serve(tiny_model_dir, tmp_path):
    """The issue's setting: `transformers serve` with the embedded SmolLM2 (its GGUF converted once)."""
    from bot.core.config import ModelSettings
    from bot.worker import model_folder

    folder = Path(model_folder(ModelSettings()))
    server = Server(folder, tmp_path / "serve.log")
    try:
        settings = openai_settings(
            tiny_model_dir, tmp_path, server.base_url, generation={"max_new_tokens": 24, "temperature": 0.0}
        )
        fake = FakeAdapter()
        async with ParleyApp(settings, [fake]) as app:
            assert app.client.model_info.name == str(folder)
            result = await fake.say("What is the capital of France?", direct=True, chat="dm")
            assert await app.router.wait_for(result.job_id) == JobStatus.DONE.value
            [reply] = fake.replies_in("dm")
            assert reply.text and reply.updates and reply.failed is None
    finally:
        server.stop()


@pytest.mark.slow
async def test_transformers_serve_cannot_continue_a_reply_and_the_job_says_so(server, tiny_model_dir, tmp_path):
    """The limitation, pinned: `transformers serve` (5.x) rejects `continue_final_message` (422,
    unknown field) and always adds a generation prompt, so a continuation fails clearly instead of
    the server answering the partial reply with a new one. vLLM accepts the same request."""
    settings = openai_settings(tiny_model_dir, tmp_path, server.base_url)
    async with OpenAIGenerationClient(settings) as client:
        chat = (ChatMessage("user", "hi"), ChatMessage("assistant", "Hello "))
        with pytest.raises(JobFailed, match="refused to continue the reply"):
            async for _ in client.submit(GenerationRequest(1, chat, GenerationSettings(temperature=0.0, max_new_tokens=5))):
                pass
        assert (await client.health()).alive  # the server is fine; only this request was refused

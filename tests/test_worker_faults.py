"""A worker that hangs is replaced: its jobs end with WorkerDead (the queue retries them)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from bot.core.config import parse_settings
from bot.core.errors import WorkerDead
from bot.generation.client import GenerationRequest
from bot.generation.subprocess_client import SubprocessGenerationClient
from bot.core.types import ChatMessage, GenerationSettings

HANGING_WORKER = """
import json, sys, time
ready = {"type": "ready", "name": "hangs", "quantization": "none", "device": "cpu", "dtype": "float32",
         "context_window": 64, "max_batch": 1, "load_seconds": 0.0}
for line in sys.stdin:
    message = json.loads(line)
    if message["type"] == "configure":
        print(json.dumps(ready), flush=True)
    elif message["type"] == "submit":
        time.sleep(3600)  # stuck: no deltas, no done
    elif message["type"] == "ping":
        print(json.dumps({"type": "pong", "nonce": message["nonce"]}), flush=True)
    elif message["type"] == "shutdown":
        break
"""


async def test_a_hung_worker_is_killed_and_replaced(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    script = tmp_path / "hanging_worker.py"
    script.write_text(HANGING_WORKER)
    settings = parse_settings({"worker": {"stall_timeout": 1.0}})
    client = SubprocessGenerationClient(settings, command=[sys.executable, str(script)], stop_timeout=1.0)
    await client.start()
    try:
        first_pid = (await client.health()).pid
        request = GenerationRequest(1, (ChatMessage("user", "hello"),), GenerationSettings(max_new_tokens=4))
        with pytest.raises(WorkerDead):
            async for _ in client.submit(request):
                pass
        assert any("it hangs; killing it" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        await client.ping()  # the replacement answers
        health = await client.health()
        assert health.alive and health.restarts == 1 and health.pid != first_pid
    finally:
        await client.stop()


# A worker that answers every job, except that a message containing POISON kills it (and every
# job it holds at that moment) each time, like a prompt that runs a real worker out of memory.
POISONABLE_WORKER = """
import json, select, sys
ready = {"type": "ready", "name": "poisonable", "quantization": "none", "device": "cpu", "dtype": "float32",
         "context_window": 512, "max_batch": 4, "load_seconds": 0.0}
def say(message):
    sys.stdout.write(json.dumps(message) + "\\n"); sys.stdout.flush()
pending = []
stdin = sys.stdin.buffer.raw  # unbuffered: select() must see every line not yet read
while True:
    readable, _, _ = select.select([stdin], [], [], 0.3)
    if not readable:  # the batch is complete: answer it
        for job in pending:
            say({"type": "started", "job_id": job, "prompt_tokens": 3, "dropped_messages": 0, "batch": 1, "batch_size": len(pending)})
            say({"type": "deltas", "texts": {str(job): f"answer {job}"}})
            say({"type": "done", "job_id": job, "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2})
        pending = []
        continue
    line = stdin.readline()
    if not line:
        break
    message = json.loads(line)
    if message["type"] == "configure":
        say(ready)
    elif message["type"] == "submit":
        if "POISON" in message["messages"][-1]["content"]:
            sys.exit(9)
        pending.append(message["job_id"])
    elif message["type"] == "ping":
        say({"type": "pong", "nonce": message["nonce"]})
    elif message["type"] == "shutdown":
        break
"""


async def test_a_poisoned_job_fails_alone_and_the_others_are_answered(tmp_path: Path, tiny_model_dir) -> None:
    from adapters.fake import FakeAdapter
    from bot.runtime.app import ParleyApp
    from tests.support import make_settings

    script = tmp_path / "poisonable_worker.py"
    script.write_text(POISONABLE_WORKER)
    settings = make_settings(tiny_model_dir, tmp_path, worker={"max_attempts": 3})
    client = SubprocessGenerationClient(settings, command=[sys.executable, str(script)], stop_timeout=1.0)
    fake = FakeAdapter()
    async with ParleyApp(settings, [fake], client=client) as app:
        await app.queue.stop()  # let the four arrive together, so they share a batch
        poisoned = await fake.say("POISON please", chat="bad")
        others = [await fake.say(f"hello {n}", chat=f"good{n}") for n in range(3)]
        await app.queue.start()
        assert await app.router.wait_for(poisoned.job_id) == "failed"
        for result in others:
            assert await app.router.wait_for(result.job_id) == "done"
        assert fake.replies_in("bad")[0].failed.startswith("Sorry, the model crashed while answering this message, 3 times")
        for n, result in enumerate(others):
            job = await app.repo.get_job(result.job_id)
            assert job.attempts <= 1  # died at most once, beside the poison, then ran alone
            assert fake.replies_in(f"good{n}")[0].text == f"answer {result.job_id}"
        await app.client.ping()  # the third replacement may still be starting
        assert (await app.client.health()).restarts == 3  # it died once per attempt of the poison

"""A worker that hangs is replaced: its jobs end with WorkerDead (the queue retries them)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from bot.config import parse_settings
from bot.errors import WorkerDead
from bot.generation import GenerationRequest
from bot.subprocess_client import SubprocessGenerationClient
from bot.types import ChatMessage, GenerationSettings

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

"""Soak: 1,000 messages across 50 conversations through the real path (router, queue, SQLite,
worker process) with a tiny random-weight model, in bursts. Prints accepted, answered,
refused (with reasons), lost and duplicated, and the bot's and the worker's peak memory, and
writes bench/results/soak.json. Not part of the test run:

    .venv/bin/python bench/soak.py [--messages 1000] [--conversations 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.fake import FakeAdapter  # noqa: E402
from bot.core.contracts import Outcome, QueueLimit, RefusalKind, RouteResult  # noqa: E402
from bot.runtime.app import ParleyApp  # noqa: E402
from bot.core.config import parse_settings  # noqa: E402


QUEUE_LIMITS = {
    QueueLimit.USER: "per-user pending limit",
    QueueLimit.CONVERSATION: "per-conversation pending limit",
    QueueLimit.TOTAL: "global queue bound",
}


def refusal_reason(result: RouteResult) -> str:
    """Why a message was not queued, from the result's values (never from its wording)."""
    refusal = result.refusal
    if refusal is None:
        return result.outcome.value  # a duplicate, an error
    if refusal.kind is RefusalKind.QUEUE_FULL and refusal.limit is not None:
        return QUEUE_LIMITS[refusal.limit]
    if refusal.kind is RefusalKind.RATE_LIMITED:
        return "per-user message rate"
    return refusal.kind.value


class MemoryWatch:
    """Samples the RSS of this process and of the worker every 0.2 s."""

    def __init__(self, app: ParleyApp) -> None:
        self.app = app
        self.bot_peak = self.worker_peak = 0
        self.samples: list[tuple[float, int, int]] = []

    async def run(self) -> None:
        me = psutil.Process()
        started = time.monotonic()
        while True:
            health = await self.app.client.health()
            worker = 0
            if health.pid:
                try:
                    worker = psutil.Process(health.pid).memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            bot = me.memory_info().rss
            self.bot_peak, self.worker_peak = max(self.bot_peak, bot), max(self.worker_peak, worker)
            self.samples.append((time.monotonic() - started, bot, worker))
            await asyncio.sleep(0.2)


async def soak(messages: int, conversations: int, users: int, seed: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="parley-soak-"))
    model = workdir / "model"
    # Written by a child process, so this (the bot's) process never imports torch and its memory
    # figure is the bot's own.
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        f"from pathlib import Path; from tests.tiny_model import write_tiny_model; write_tiny_model(Path({str(model)!r}))",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    if await writer.wait() != 0:
        raise SystemExit("could not write the tiny model")
    settings = parse_settings(
        {
            "model": {"model": str(model), "device": "cpu", "quantization": "none", "dtype": "float32"},
            "storage": {"url": f"sqlite+aiosqlite:///{workdir}/soak.db"},
            "generation": {"max_new_tokens": 8, "temperature": 0.0},
            "worker": {"max_batch": 8},
            "queue": {"max_pending": 200, "max_pending_per_conversation": 4, "max_pending_per_user": 6, "user_messages_per_minute": 60},
        }
    )
    rng = random.Random(seed)
    fake = FakeAdapter()
    refused: collections.Counter[str] = collections.Counter()
    accepted: list[tuple[str, str]] = []  # (chat, message id)
    started = time.monotonic()
    async with ParleyApp(settings, [fake]) as app:
        watch = MemoryWatch(app)
        watcher = asyncio.create_task(watch.run())
        sent = 0
        while sent < messages:
            burst = min(rng.randint(20, 80), messages - sent)
            results = []
            for _ in range(burst):
                chat = f"c{rng.randrange(conversations)}"
                message_id = f"m{sent}"
                user = f"u{rng.randrange(users)}"
                results.append((chat, message_id, fake.say(f"message {sent} from {user}", chat=chat, user=user, message_id=message_id)))
                sent += 1
            for chat, message_id, pending in results:
                result = await pending
                if result.outcome is Outcome.QUEUED:
                    accepted.append((chat, message_id))
                else:
                    refused[refusal_reason(result)] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.5))
        await app.queue.run_until_empty(timeout=1800)
        watcher.cancel()
        replies = collections.Counter((r.conversation.key, r.reply_to) for r in fake.replies if r.text is not None)
        answered = sum(1 for key in accepted if replies.get(key, 0) >= 1)
        duplicated = sum(1 for key in accepted if replies.get(key, 0) > 1)
        elapsed = time.monotonic() - started
        samples = watch.samples
        third = max(1, len(samples) // 3)
        result = {
            "messages": messages,
            "conversations": conversations,
            "users": users,
            "accepted": len(accepted),
            "answered": answered,
            "refused": sum(refused.values()),
            "refused_reasons": dict(refused),
            "lost": len(accepted) - answered,
            "duplicated": duplicated,
            "seconds": round(elapsed, 1),
            "bot_peak_rss_mib": round(watch.bot_peak / 2**20, 1),
            "worker_peak_rss_mib": round(watch.worker_peak / 2**20, 1),
            "bot_rss_mib_first_third_vs_last_third": [
                round(max(s[1] for s in samples[:third]) / 2**20, 1),
                round(max(s[1] for s in samples[-third:]) / 2**20, 1),
            ],
            "worker_restarts": (await app.client.health()).restarts,
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(soak(args.messages, args.conversations, args.users, args.seed))
    for key, value in result.items():
        print(f"{key:40} {value}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Chaos bench: three `parley run` processes (Telegram on, each with its own worker and the tiny
random model) on one throwaway PostgreSQL share 300 messages over 30 conversations sent through
the loopback Telegram fake, while a driver SIGKILLs a random process every few seconds and starts
it again, and PostgreSQL itself is restarted once. Not part of the test run:

    .venv/bin/python bench/chaos.py [--messages 300] [--conversations 30] [--processes 3]

Printed at the end and written to bench/results/chaos.json: sent, accepted (recorded), answered,
lost (sent and never answered), duplicated (answered by more than one reply), two-at-once (pairs
of jobs of one conversation whose started..finished times overlap), and the 409 Conflicts the fake
saw (two processes polling one token). All but accepted and answered should be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import pg_server  # noqa: E402
from tests.fakes.telegram_api import FakeTelegramAPI  # noqa: E402
from tests.tiny_model import write_tiny_model  # noqa: E402

TOKEN_ENV = "PARLEY_CHAOS_TELEGRAM_TOKEN"


def write_config(folder: Path, model_dir: Path, fake: FakeTelegramAPI, url: str, lease: float) -> Path:
    config = folder / "config.toml"
    config.write_text(
        f"[model]\nmodel = {json.dumps(str(model_dir))}\ndevice = \"cpu\"\nquantization = \"none\"\ndtype = \"float32\"\n"
        f"[storage]\nurl = {json.dumps(url)}\n"
        "[generation]\nmax_new_tokens = 24\ntemperature = 0.0\n"
        "[worker]\nmax_batch = 8\nthreads = 1\n"
        "[queue]\nmax_pending = 10000\nmax_pending_per_conversation = 1000\nmax_pending_per_user = 1000\n"
        "user_messages_per_minute = 100000\n"
        f"[telegram]\nenabled = true\ntoken_env = \"{TOKEN_ENV}\"\napi_base_url = \"{fake.base_url}\"\n"
        f"edit_interval = 0.2\nlease_seconds = {lease}\n"
        "[console]\nenabled = false\n"
    )
    return config


class Bots:
    """The bot processes, each restartable; stderr of every life kept in `logs`."""

    def __init__(self, config: Path, token: str, count: int, logs: Path) -> None:
        self.config, self.token, self.logs = config, token, logs
        self.processes: list[subprocess.Popen | None] = [None] * count
        self.lives = Counter()
        self.kills = 0

    def start(self, index: int) -> None:
        self.lives[index] += 1
        log = open(self.logs / f"bot{index}-{self.lives[index]}.log", "wb")  # noqa: SIM115 - owned by the child
        self.processes[index] = subprocess.Popen(
            [sys.executable, "-m", "bot.runtime.cli", "-c", str(self.config), "run"],
            cwd=ROOT, env={**os.environ, TOKEN_ENV: self.token}, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
        )

    def kill(self, index: int) -> None:
        process = self.processes[index]
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            self.kills += 1

    def stop_all(self) -> None:
        for process in self.processes:
            if process is not None and process.poll() is None:
                process.terminate()
        for process in self.processes:
            if process is not None:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()


async def read_jobs(url: str) -> tuple[set[tuple[str, str]], dict[tuple[str, str], int], list[tuple]]:
    """Accepted user messages (chat, platform id); done jobs per message; every job's interval."""
    import asyncpg

    connection = await asyncpg.connect(pg_server._asyncpg_dsn(url))
    try:
        accepted = {
            (r["key"], r["platform_message_id"])
            for r in await connection.fetch(
                "SELECT c.key, m.platform_message_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.role = 'user'"
            )
        }
        done: Counter = Counter()
        intervals = []
        for r in await connection.fetch(
            "SELECT j.conversation_id, j.status, j.started_at, j.finished_at, c.key, u.platform_message_id "
            "FROM jobs j JOIN messages u ON u.id = j.message_id JOIN conversations c ON c.id = j.conversation_id"
        ):
            if r["status"] == "done":
                done[(r["key"], r["platform_message_id"])] += 1
            if r["started_at"] is not None and r["finished_at"] is not None:
                intervals.append((r["conversation_id"], r["started_at"], r["finished_at"]))
    finally:
        await connection.close()
    return accepted, done, intervals


def overlapping(intervals: list[tuple]) -> int:
    pairs = 0
    by_conversation: dict[int, list[tuple]] = {}
    for conversation, start, end in intervals:
        by_conversation.setdefault(conversation, []).append((start, end))
    for spans in by_conversation.values():
        spans.sort()
        for (_, end), (next_start, _) in zip(spans, spans[1:]):
            if next_start < end:
                pairs += 1
    return pairs


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--send-seconds", type=float, default=90.0, help="the messages are spread over this long")
    parser.add_argument("--kill-every", type=float, default=6.0, help="seconds between SIGKILLs, on average")
    parser.add_argument("--lease", type=float, default=4.0, help="[telegram] lease_seconds")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds allowed to answer everything at the end")
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.monotonic()
    admin_url = pg_server.server_url()
    if not pg_server.can_restart():
        print(f"note: PostgreSQL from ${pg_server.ENV_URL} cannot be restarted; that part is skipped")
    url = await pg_server.create_database(admin_url)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="parley-chaos-") as scratch:
        folder = Path(scratch)
        logs = out / "chaos-logs"
        logs.mkdir(exist_ok=True)
        for old in logs.glob("*.log"):
            old.unlink()
        model_dir = write_tiny_model(folder / "model")
        async with FakeTelegramAPI(bot_username="parley_bot") as fake:
            config = write_config(folder, model_dir, fake, url, args.lease)
            subprocess.run([sys.executable, "-m", "bot.runtime.cli", "-c", str(config), "db", "upgrade"],
                           cwd=ROOT, check=True, capture_output=True, timeout=120)
            bots = Bots(config, fake.token, args.processes, logs)
            for index in range(args.processes):
                bots.start(index)
            await fake.wait_for(lambda: fake.calls_to("getUpdates"), timeout=120)
            people = [fake.make_user(f"User{n}") for n in range(args.conversations)]
            sent: list[tuple[str, str]] = []
            chaos_until = time.monotonic() + args.send_seconds
            pg_restart_at = time.monotonic() + args.send_seconds / 2
            pg_restarted = False

            async def send() -> None:
                gap = args.send_seconds / max(args.messages, 1)
                for number in range(args.messages):
                    person = people[number % len(people)]
                    update = fake.add_private_message(person, f"message {number} from {person['first_name']}")
                    sent.append((str(person["id"]), str(update["message"]["message_id"])))
                    await asyncio.sleep(gap)

            async def chaos() -> None:
                nonlocal pg_restarted
                while time.monotonic() < chaos_until:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * args.kill_every)
                    if not pg_restarted and time.monotonic() >= pg_restart_at and pg_server.can_restart():
                        print(f"{time.monotonic() - started:6.1f} s  restarting PostgreSQL", flush=True)
                        await asyncio.to_thread(pg_server.stop_server)
                        await asyncio.sleep(2.0)
                        await asyncio.to_thread(pg_server.start_server)
                        pg_restarted = True
                        continue
                    victim = rng.randrange(args.processes)
                    print(f"{time.monotonic() - started:6.1f} s  SIGKILL bot {victim}", flush=True)
                    bots.kill(victim)
                    await asyncio.sleep(rng.uniform(0.5, 2.0))
                    bots.start(victim)

            await asyncio.gather(send(), chaos())
            for index, process in enumerate(bots.processes):
                if process is None or process.poll() is not None:
                    bots.start(index)
            print(f"{time.monotonic() - started:6.1f} s  chaos over; waiting for every accepted message", flush=True)
            deadline = time.monotonic() + args.settle
            while True:
                accepted, done, intervals = await read_jobs(url)
                if (set(sent) <= accepted and accepted <= set(done)) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(2.0)
            await asyncio.sleep(3.0)  # let a stray duplicate surface
            bots.stop_all()
            accepted, done, intervals = await read_jobs(url)
            replies = Counter(
                (str(s.chat_id), str(s.message["reply_to_message"]["message_id"]))
                for s in fake.sent
                if s.message.get("reply_to_message")
            )
            sent_set = set(sent)
            report = {
                "sent": len(sent),
                "accepted": len(accepted & sent_set),
                "answered": len([m for m in sent_set if done.get(m)]),
                "lost": len([m for m in sent_set if not done.get(m)]),
                "duplicated": len([m for m in sent_set if replies.get(m, 0) > 1 or done.get(m, 0) > 1]),
                # of those: answered by two jobs (a real double answer), and replies posted twice
                # by one job (killed after Telegram took a message, before its id was stored)
                "answered_by_two_jobs": len([m for m in sent_set if done.get(m, 0) > 1]),
                "posted_twice": len([m for m in sent_set if replies.get(m, 0) > 1]),
                "two_at_once": overlapping(intervals),
                "poll_conflicts": fake.poll_conflicts,
                "kills": bots.kills,
                "postgres_restarted": pg_restarted,
                "processes": args.processes,
                "conversations": args.conversations,
                "seconds": round(time.monotonic() - started, 1),
            }
    await pg_server.drop_database(admin_url, url)
    print(
        f"accepted {report['accepted']}/{report['sent']}, answered {report['answered']}, lost {report['lost']}, "
        f"duplicated {report['duplicated']} (answered by two jobs {report['answered_by_two_jobs']}, "
        f"a reply posted twice {report['posted_twice']}), two-at-once {report['two_at_once']}, "
        f"409 conflicts {report['poll_conflicts']} ({report['kills']} SIGKILLs, PostgreSQL restarted: "
        f"{report['postgres_restarted']}, {report['seconds']:.0f} s)"
    )
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    bad = report["lost"] or report["duplicated"] or report["two_at_once"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

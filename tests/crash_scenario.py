"""The crash scenario shared by tests/test_crash.py and bench/crash.py: a real `parley run`
subprocess talking to the loopback Telegram fake, SIGKILLed again and again while people send
bursts, then restarted until every accepted message is answered. It reports what was lost and
what was answered twice, judged from the database, not from timing."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from adapters.formatting import markdown_to_telegram_html
from tests.fakes.telegram_api import FakeTelegramAPI

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "PARLEY_TEST_TELEGRAM_TOKEN"
KILL_POINTS = (0.05, 0.6, 1.5, 3.0)
"""Seconds after a burst: while messages are recorded, while jobs wait, while replies stream."""

# Every value `jobs.reply_platform_ids` ever held, kept by a trigger the scenario adds to the
# database: the record of which posted message ids the bot persisted before it died.
_PERSISTED_LOG = """
CREATE TABLE IF NOT EXISTS crash_persisted_ids (job_id INTEGER, ids TEXT);
CREATE TRIGGER IF NOT EXISTS crash_log_ids AFTER UPDATE OF reply_platform_ids ON jobs
WHEN NEW.reply_platform_ids IS NOT NULL
BEGIN INSERT INTO crash_persisted_ids (job_id, ids) VALUES (NEW.id, NEW.reply_platform_ids); END;
"""


@dataclass
class CrashReport:
    sent: int = 0
    accepted: int = 0
    answered: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    duplicated: list[tuple[str, str]] = field(default_factory=list)
    excused: list[tuple[str, str]] = field(default_factory=list)
    """Duplicates whose earlier message's id the bot never persisted: the platform posted it and
    the process died before the id reached the database — the one window no bot can close."""
    wrong_final_text: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unexcused(self) -> list[tuple[str, str]]:
        return [key for key in self.duplicated if key not in self.excused]

    def line(self) -> str:
        return (
            f"sent {self.sent}, accepted {self.accepted}, answered {self.answered}, lost {len(self.lost)}, "
            f"duplicated {len(self.duplicated)} (excused {len(self.excused)}: id never persisted)"
        )


def _squeezed(text: str) -> str:
    return "".join(text.split())


def _as_telegram_shows(text: str) -> str:
    """The stored Markdown as Telegram shows it: the adapter sends it as HTML (inline code, bold…),
    and the platform shows the text without the markup."""
    return html.unescape(re.sub(r"<[^>]+>", "", markdown_to_telegram_html(text)))


def write_config(tmp_path: Path, model_dir: Path, fake: FakeTelegramAPI) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f"[model]\nmodel = {json.dumps(str(model_dir))}\ndevice = \"cpu\"\n"
        f"[storage]\nurl = {json.dumps(f'sqlite+aiosqlite:///{tmp_path}/p.db')}\n"
        "[generation]\nmax_new_tokens = 40\ntemperature = 0.0\n"
        "[worker]\nmax_batch = 4\n"
        "[queue]\nmax_pending = 1000\nmax_pending_per_conversation = 100\nmax_pending_per_user = 100\n"
        "user_messages_per_minute = 1000\n"
        f"[telegram]\nenabled = true\ntoken_env = \"{TOKEN_ENV}\"\napi_base_url = \"{fake.base_url}\"\n"
        "edit_interval = 0.05\n"
        "[console]\nenabled = false\n"
    )
    return config


def prepare_database(config: Path, db: Path) -> None:
    """Create the schema with the real migrations, then add the persisted-ids log."""
    subprocess.run(
        [sys.executable, "-m", "bot.runtime.cli", "-c", str(config), "db", "upgrade"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )
    with sqlite3.connect(db) as connection:
        connection.executescript(_PERSISTED_LOG)


async def start_bot(config: Path, token: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.runtime.cli", "-c", str(config), "run",
        cwd=ROOT, env={**os.environ, TOKEN_ENV: token}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


async def polling(fake: FakeTelegramAPI, calls_before: int) -> None:
    await fake.wait_for(lambda: len(fake.calls_to("getUpdates")) > calls_before, timeout=60)


def accepted_and_answered(db: Path) -> tuple[set[tuple[str, str]], dict[tuple[str, str], str]]:
    """Every recorded user message as (chat, platform message id), and the final reply text of
    each whose job is done. (Telegram numbers messages per chat.)"""
    with sqlite3.connect(db) as connection:
        accepted = set(
            connection.execute(
                "SELECT c.key, m.platform_message_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.role = 'user'"
            ).fetchall()
        )
        answered = {
            (chat, message): text
            for chat, message, text in connection.execute(
                "SELECT c.key, u.platform_message_id, r.text FROM jobs j JOIN messages u ON u.id = j.message_id "
                "JOIN messages r ON r.id = j.reply_message_id JOIN conversations c ON c.id = j.conversation_id "
                "WHERE j.status = 'done'"
            ).fetchall()
        }
    return accepted, answered


def persisted_ids(db: Path) -> dict[tuple[str, str], set[str]]:
    """For each user message: every reply message id the bot ever persisted for its jobs."""
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT c.key, u.platform_message_id, p.ids FROM crash_persisted_ids p JOIN jobs j ON j.id = p.job_id "
            "JOIN messages u ON u.id = j.message_id JOIN conversations c ON c.id = j.conversation_id"
        ).fetchall()
    persisted: dict[tuple[str, str], set[str]] = {}
    for chat, message, ids in rows:
        persisted.setdefault((chat, message), set()).update(str(i) for i in json.loads(ids))
    return persisted


async def run_crash_scenario(model_dir: Path, tmp_path: Path, *, users: int = 5, kill_points=KILL_POINTS) -> CrashReport:
    report = CrashReport()
    db = tmp_path / "p.db"
    async with FakeTelegramAPI(bot_username="parley_bot") as fake:
        config = write_config(tmp_path, model_dir, fake)
        prepare_database(config, db)
        people = [fake.make_user(f"User{n}") for n in range(users)]
        for kill_after in kill_points:
            process = await start_bot(config, fake.token)
            await polling(fake, len(fake.calls_to("getUpdates")))
            for person in people:
                fake.add_private_message(person, f"message {report.sent} from {person['first_name']}")
                report.sent += 1
            await asyncio.sleep(kill_after)
            process.kill()
            await process.wait()
        process = await start_bot(config, fake.token)
        try:
            await polling(fake, len(fake.calls_to("getUpdates")))

            def settled() -> bool:
                accepted, answered = accepted_and_answered(db)
                return bool(accepted) and set(accepted) <= set(answered)

            await fake.wait_for(settled, timeout=240)
            await asyncio.sleep(0.5)  # let any stray duplicate surface
        finally:
            process.terminate()
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
        if process.returncode != 0:
            raise AssertionError(f"parley run exited {process.returncode}: {stderr.decode()[-2000:]}")

        accepted, answered = accepted_and_answered(db)
        persisted = persisted_ids(db)
        replies_to: dict[tuple[str, str], list[dict]] = {}
        for sent in fake.sent:
            reply_to = (sent.message.get("reply_to_message") or {}).get("message_id")
            if reply_to is not None:
                replies_to.setdefault((str(sent.chat_id), str(reply_to)), []).append(sent.message)
        report.accepted, report.answered = len(accepted), len(set(accepted) & set(answered))
        report.lost = sorted(m for m in accepted if m not in answered)
        report.duplicated = sorted(m for m in accepted if len(replies_to.get(m, [])) > 1)
        report.excused = [
            key for key in report.duplicated
            if all(str(m["message_id"]) not in persisted.get(key, set()) for m in replies_to[key][:-1])
        ]
        for key in accepted:
            if key not in answered or not replies_to.get(key):
                continue
            last = replies_to[key][-1]
            shown = fake.message(int(key[0]), last["message_id"])["text"]
            if _squeezed(shown) not in {_squeezed(answered[key]), _squeezed(_as_telegram_shows(answered[key]))}:
                report.wrong_final_text.append(key)
    return report

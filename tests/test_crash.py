"""The bot process killed with SIGKILL mid-burst, again and again, then restarted: every accepted
message gets exactly one final reply. The bot is a real `parley run` subprocess talking to the
fake Telegram Bot API in this process, with the tiny model in its worker."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.telegram_api import FakeTelegramAPI

ROOT = Path(__file__).resolve().parent.parent
TOKEN_ENV = "PARLEY_TEST_TELEGRAM_TOKEN"


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


async def start_bot(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.runtime.cli", "-c", str(config), "run",
        cwd=ROOT, env=os.environ.copy(), stdin=asyncio.subprocess.DEVNULL,
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


@pytest.mark.slow
async def test_sigkill_during_a_burst_loses_nothing_and_answers_once(monkeypatch, tiny_model_dir, tmp_path):
    async with FakeTelegramAPI(bot_username="parley_bot") as fake:
        monkeypatch.setenv(TOKEN_ENV, fake.token)
        config = write_config(tmp_path, tiny_model_dir, fake)
        users = [fake.make_user(f"User{n}") for n in range(5)]
        sent_updates = []
        kills: list[float] = []
        # Kill points: while messages are being recorded, while jobs wait, while replies stream.
        for kill_after in (0.05, 0.6, 1.5, 3.0):
            process = await start_bot(config)
            await polling(fake, len(fake.calls_to("getUpdates")))
            for user in users:
                sent_updates.append(fake.add_private_message(user, f"message {len(sent_updates)} from {user['first_name']}"))
            await asyncio.sleep(kill_after)
            kills.append(time.monotonic())
            process.kill()
            await process.wait()
        process = await start_bot(config)
        try:
            db = tmp_path / "p.db"
            await polling(fake, len(fake.calls_to("getUpdates")))

            def settled() -> bool:
                accepted, answered = accepted_and_answered(db)
                return bool(accepted) and set(accepted) <= set(answered)

            await fake.wait_for(settled, timeout=240)
            await asyncio.sleep(0.5)  # let any stray duplicate surface
        finally:
            process.terminate()
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, stderr.decode()[-2000:]

    accepted, answered = accepted_and_answered(db)
    replies_to: dict[tuple[str, str], list[dict]] = {}
    for sent in fake.sent:
        reply_to = (sent.message.get("reply_to_message") or {}).get("message_id")
        if reply_to is not None:
            replies_to.setdefault((str(sent.chat_id), str(reply_to)), []).append(sent.message)
    lost = [m for m in accepted if m not in answered]
    duplicated = [m for m in accepted if len(replies_to.get(m, [])) > 1]
    # The one window no bot can close: Telegram has posted a message, and the process dies before
    # the answer (with the message's id) reaches it, so the restart cannot know it exists. A
    # duplicate is only excused when a kill landed within a moment of that message's sendMessage.
    sends = {s.message["message_id"]: t for s, t in zip(fake.sent, [c.time for c in fake.calls_to("sendMessage") if c.ok])}
    unexplained = [
        key for key in duplicated
        if not any(0 <= kill - sends[m["message_id"]] < 0.25 for m in replies_to[key][:-1] for kill in kills)
    ]
    print(f"updates sent {len(sent_updates)}, accepted {len(accepted)}, answered {len(answered)}, "
          f"lost {len(lost)}, duplicated {len(duplicated)} ({len(duplicated) - len(unexplained)} in the send window)")
    assert lost == [] and unexplained == []
    for key in accepted:
        first = replies_to[key][-1]
        shown = fake.message(int(key[0]), first["message_id"])["text"]
        assert "".join(shown.split()) == "".join(answered[key].split())  # the final text, not a partial
    # Nothing the platform delivered went unrecorded, except in PTB's confirm-before-handle window.
    assert len(accepted) >= len(sent_updates) - 1

"""Leases: one process polls a Telegram token at a time, chosen through the database.

The storage tests run on PostgreSQL (a throwaway server, tests/pg_server.py) and SQLite. The
end-to-end tests run two complete Parley apps with the real python-telegram-bot against one
loopback fake Telegram, which ends overlapping getUpdates long polls with 409 Conflict as
Telegram does.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from adapters.lease import account_role
from adapters.telegram import TelegramAdapter
from bot.core.types import ConversationKey
from bot.runtime.app import ParleyApp
from bot.runtime.backends import make_generation_client
from storage import Database, Repository
from tests.fakes.telegram_api import FakeTelegramAPI
from tests.pg_server import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.support import make_settings

TOKEN_ENV = "PARLEY_TEST_TELEGRAM_TOKEN"
LEASE = 1.2  # seconds: takeover within about 1.25 × this


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite+aiosqlite:///{tmp_path}/parley.db"


async def test_a_lease_has_one_holder_until_it_expires_or_is_released(url: str) -> None:
    first, second = Database(url), Database(url)
    await first.start()
    await second.start()
    try:
        a, b = Repository(first.sessions, owner="a"), Repository(second.sessions, owner="b")
        results = await asyncio.gather(*(repo.lease("telegram:x", repo.owner, 1.0) for repo in (a, b) for _ in range(5)))
        winners = {holder for holder, got in zip(["a"] * 5 + ["b"] * 5, results) if got}
        assert len(winners) == 1
        [winner] = winners
        loser = b if winner == "a" else a
        keeper = a if winner == "a" else b
        assert await keeper.lease("telegram:x", winner, 1.0)  # renewed
        assert not await loser.lease("telegram:x", loser.owner, 1.0)
        assert await loser.lease("discord:y", loser.owner, 1.0)  # another role is apart
        assert await loser.lease_holder("telegram:x") == winner
        await asyncio.sleep(1.2)
        assert await loser.lease_holder("telegram:x") is None
        assert await loser.lease("telegram:x", loser.owner, 5.0)  # expired: taken over
        assert not await keeper.lease("telegram:x", winner, 5.0)
        assert not await keeper.release_lease("telegram:x", winner)  # not the holder: nothing
        assert await loser.release_lease("telegram:x", loser.owner)
        assert await keeper.lease("telegram:x", winner, 5.0)  # released: free at once
    finally:
        await first.stop()
        await second.stop()


def test_the_role_names_the_account_by_a_hash_of_its_token() -> None:
    role = account_role("telegram", "123456:secret-token")
    assert role.startswith("telegram:") and "secret" not in role and "123456" not in role
    assert role == account_role("telegram", "123456:secret-token") != account_role("telegram", "123456:other")


# -- two apps, one token ------------------------------------------------------------------------


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch):
    async with FakeTelegramAPI(bot_username="parley_bot") as server:
        monkeypatch.setenv(TOKEN_ENV, server.token)
        yield server


def settings_for(model_dir: Path, tmp_path: Path, fake: FakeTelegramAPI, url: str):
    telegram = {
        "enabled": True, "token_env": TOKEN_ENV, "api_base_url": fake.base_url, "edit_interval": 0.05,
        "lease_seconds": LEASE,
    }
    return make_settings(model_dir, tmp_path, telegram=telegram, console={"enabled": False}, storage={"url": url})


async def start_app(settings) -> tuple[ParleyApp, TelegramAdapter]:
    adapter = TelegramAdapter.from_config(settings)
    app = ParleyApp(settings, [adapter], client=make_generation_client(settings, in_process=True))
    await app.start()
    return app, adapter


def polls_between(fake: FakeTelegramAPI, since: int) -> list:
    return [call for call in fake.calls[since:] if call.method == "getUpdates"]


async def answered_once(fake: FakeTelegramAPI, updates: list[dict], timeout: float = 60.0) -> None:
    """Every update's message gets exactly one reply (a sent message replying to it)."""
    wanted = {(u["message"]["chat"]["id"], u["message"]["message_id"]) for u in updates}

    def replies() -> Counter:
        return Counter(
            (sent.chat_id, sent.message["reply_to_message"]["message_id"])
            for sent in fake.sent
            if sent.message.get("reply_to_message")
        )

    await fake.wait_for(lambda: wanted <= set(replies()), timeout=timeout)
    await asyncio.sleep(LEASE)  # room for a duplicate to show
    counts = replies()
    assert {key: counts[key] for key in wanted} == {key: 1 for key in wanted}


async def test_two_apps_on_one_token_poll_one_at_a_time_and_answer_once(
    fake: FakeTelegramAPI, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_adapter = await start_app(settings_for(tiny_model_dir, tmp_path / "a", fake, url))
    second, second_adapter = await start_app(settings_for(tiny_model_dir, tmp_path / "b", fake, url))
    apps = {"first": (first, first_adapter), "second": (second, second_adapter)}
    try:
        await asyncio.sleep(3 * LEASE)  # several renewals and retries
        assert fake.poll_conflicts == 0  # two pollers on one token: Telegram's 409 Conflict
        holders = [name for name, (_, adapter) in apps.items() if adapter._lease.held]
        assert len(holders) == 1
        users = [fake.make_user(f"user{i}") for i in range(6)]
        updates = [fake.add_private_message(user, f"hello {n}") for n in range(2) for user in users]
        await answered_once(fake, updates)
        assert fake.poll_conflicts == 0

        # The poller dies without giving the lease up: the other polls within about 1.25 × LEASE.
        [dead] = holders
        dead_app, dead_adapter = apps.pop(dead)
        [(survivor_app, survivor_adapter)] = apps.values()
        monkeypatch.setattr(dead_adapter.core, "release_lease", _never_released)
        await dead_app.stop()
        died_at = asyncio.get_running_loop().time()
        later = [fake.add_private_message(user, "still there?") for user in users]
        await fake.wait_for(lambda: survivor_adapter._lease.held, timeout=3 * LEASE)
        took_over = asyncio.get_running_loop().time() - died_at
        assert took_over <= 1.25 * LEASE + 0.5
        await answered_once(fake, later)
        assert fake.poll_conflicts == 0
        await survivor_app.stop()
    finally:
        for app, _ in apps.values():
            await app.stop()


async def _never_released(role: str, holder: str) -> None:  # a killed process gives nothing up
    return None


async def test_the_process_that_does_not_poll_still_sends(
    fake: FakeTelegramAPI, tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shared.db"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, first_adapter = await start_app(settings_for(tiny_model_dir, tmp_path / "a", fake, url))
    second, second_adapter = await start_app(settings_for(tiny_model_dir, tmp_path / "b", fake, url))
    try:
        await fake.wait_for(lambda: first_adapter._lease.held or second_adapter._lease.held, timeout=5)
        idle = second_adapter if first_adapter._lease.held else first_adapter
        assert not idle._lease.held
        user = fake.make_user("Ada")
        fake.private_chat(user)
        await idle.send(ConversationKey("telegram", str(user["id"])), "a notice from the other process")
        assert fake.messages_in(user["id"]) == ["a notice from the other process"]
    finally:
        await first.stop()
        await second.stop()

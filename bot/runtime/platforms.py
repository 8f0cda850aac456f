"""Building the platform adapters the config enables: the one place that imports `adapters/`
modules, each only when its platform is enabled."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.core.config import Settings
from bot.core.errors import ConfigError

if TYPE_CHECKING:
    from bot.core.contracts import Adapter

__all__ = ["enabled_adapters"]


def enabled_adapters(settings: Settings, *, console_only: bool = False) -> list[Adapter]:
    """Build the adapters the config enables. Each platform's module is imported only when enabled,
    so a missing platform library never breaks the others."""
    adapters: list[Adapter] = []
    if console_only or settings.console.enabled:
        from adapters.console import ConsoleAdapter

        adapters.append(ConsoleAdapter.from_config(settings))
    if not console_only and settings.telegram.enabled:
        try:
            from adapters.telegram import TelegramAdapter
        except ImportError as exc:
            raise ConfigError(
                f"[telegram] enabled = true, but python-telegram-bot is not installed ({exc}); "
                "pip install 'python-telegram-bot[rate-limiter]'"
            ) from None
        adapters.append(TelegramAdapter.from_config(settings))
    if not console_only and settings.discord.enabled:
        try:
            from adapters.discord import DiscordAdapter
        except ImportError as exc:
            raise ConfigError(f"[discord] enabled = true, but discord.py is not installed ({exc}); pip install discord.py") from None
        adapters.append(DiscordAdapter.from_config(settings))
    if not adapters:
        raise ConfigError("no adapter is enabled; set enabled = true in [console], [telegram] or [discord]")
    return adapters

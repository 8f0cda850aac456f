"""Smaller holes of issue 11: `nan` and infinities are refused for every number in the config, and
every secret — the OpenAI-compatible API key, a password inside [storage] url or the URL from
url_env, platform tokens — is scrubbed from log lines and from what the command line prints."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from bot.core.config import Settings, load_settings, parse_settings
from bot.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

FLOAT_KEYS = [
    (section.name, key.name)
    for section in fields(Settings)
    if section.name != "source"
    for key in fields(section.default_factory())  # type: ignore[misc]
    if key.type in (float, "float")
]


def test_there_are_float_keys_to_check():
    assert ("generation", "temperature") in FLOAT_KEYS and ("worker", "ready_timeout") in FLOAT_KEYS


@pytest.mark.parametrize(("section", "key"), FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_for_every_float(tmp_path, section, key, value):
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert f"[{section}] {key}" in str(info.value) and "finite" in str(info.value)


def log_through_parley(settings: Settings, tmp_path: Path, *lines: str) -> str:
    from bot.runtime.logs import setup_logging

    settings = settings.with_overrides(bot=type(settings.bot)(log_file=str(tmp_path / "log")))
    setup_logging(settings, quiet=False, verbose=True)
    try:
        for line in lines:
            logging.getLogger("parley.test").warning("%s", line)
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    return (tmp_path / "log").read_text()


def test_the_openai_api_key_is_redacted_from_logs(tmp_path, monkeypatch):
    key = "sk-live-0123456789abcdef"
    monkeypatch.setenv("PARLEY_TEST_OPENAI_KEY", key)
    settings = parse_settings({"openai": {"api_key_env": "PARLEY_TEST_OPENAI_KEY"}})
    written = log_through_parley(settings, tmp_path, f"Authorization: Bearer {key}")
    assert key not in written and "Bearer ***" in written


def test_a_password_inside_an_inline_database_url_is_redacted_from_logs(tmp_path):
    settings = parse_settings({"storage": {"url": "postgresql+asyncpg://parley:hunter2-db-pass@db.example/parley"}})
    written = log_through_parley(settings, tmp_path, "could not connect to postgresql+asyncpg://parley:hunter2-db-pass@db.example/parley")
    assert "hunter2-db-pass" not in written and "parley:***@db.example" in written


def test_config_check_prints_no_secret(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[storage]\nurl = "postgresql+asyncpg://parley:hunter2-db-pass@db.example/parley"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bot.runtime.cli", "-c", str(config), "config", "check"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2-db-pass" not in result.stdout + result.stderr
    assert "db.example" in result.stdout  # the rest of the URL is still shown

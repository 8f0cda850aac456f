"""The `parley` command as a user runs it: a separate process, piped input, real worker process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARLEY = [sys.executable, "-m", "bot.runtime.cli"]
SHOW_MODULES = (
    "import sys, bot.runtime.cli\n"
    "try:\n    code = bot.runtime.cli.main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
    "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_parley(args, *, stdin="", env=None, timeout=240, script=None):
    command = [sys.executable, "-c", script, *args] if script else [*PARLEY, *args]
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def write_config(path: Path, model: str, db: Path, **extra: str) -> Path:
    lines = [
        "[model]",
        f"model = {json.dumps(model)}",
        'device = "cpu"',
        "[storage]",
        f"url = {json.dumps(f'sqlite+aiosqlite:///{db}')}",
        "[generation]",
        "temperature = 0.0",
        f"max_new_tokens = {extra.get('max_new_tokens', '8')}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def job_prompts(db: Path) -> list[list[dict]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT prompt FROM jobs ORDER BY id").fetchall()
    return [json.loads(row[0]) for row in rows]


def test_help_is_instant_and_imports_no_torch():
    started = time.monotonic()
    result = run_parley(["--help"], script=SHOW_MODULES)
    assert result.returncode == 0
    assert "chat" in result.stdout and "run" in result.stdout and "db" in result.stdout
    assert "HEAVY []" in result.stderr
    assert time.monotonic() - started < 10


def test_the_bot_process_never_imports_torch(tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "c.toml", str(tiny_model_dir), tmp_path / "p.db")
    result = run_parley(["-c", str(config), "chat"], stdin="hello\n/exit\n", script=SHOW_MODULES)
    assert result.returncode == 0, result.stderr
    assert "Parley: " in result.stdout
    assert "HEAVY []" in result.stderr  # the model ran, in the worker process


def test_piped_chat_remembers_across_runs_and_reset_forgets(tiny_model_dir, tmp_path):
    db = tmp_path / "p.db"
    config = str(write_config(tmp_path / "c.toml", str(tiny_model_dir), db))
    first = run_parley(["-c", config, "chat"], stdin="My name is Ada.\n/exit\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("Parley: ") == 1
    second = run_parley(["-c", config, "chat"], stdin="What is my name?\n")  # ends at end of input
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("Parley: ") == 1
    prompts = job_prompts(db)
    users = [m["content"] for m in prompts[1] if m["role"] == "user"]
    assert users == ["My name is Ada.", "What is my name?"]
    assert [m["role"] for m in prompts[1]] == ["system", "user", "assistant", "user"]
    third = run_parley(["-c", config, "chat"], stdin="/reset\nWho am I?\n/exit\n")
    assert "History cleared (4 messages forgotten)." in third.stdout
    assert [m["content"] for m in job_prompts(db)[-1] if m["role"] != "system"] == ["Who am I?"]
    # Another named conversation has its own history.
    other = run_parley(["-c", config, "chat", "--conversation", "work"], stdin="/status\n")
    assert "History: 0 messages" in other.stdout


def test_bad_config_stops_start_up_naming_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[model]\nquantization = "2bit"\n')
    result = run_parley(["-c", str(config), "chat"])
    assert result.returncode == 2
    assert "[model] quantization = '2bit' is not allowed; use one of: 'auto', 'int8', '4bit', '8bit', 'none'" in result.stderr


def test_a_model_that_cannot_load_is_a_clear_error(tmp_path):
    config = write_config(tmp_path / "c.toml", str(tmp_path / "no-such-model"), tmp_path / "p.db")
    result = run_parley(["-c", str(config), "chat"], stdin="hi\n")
    assert result.returncode == 1
    assert "[model] model" in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path):
    db = tmp_path / "fresh.db"
    config = write_config(tmp_path / "c.toml", "embedded", db)
    result = run_parley(["-c", str(config), "db", "upgrade"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("database is at revision ")
    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "jobs", "audit_log", "alembic_version"} <= tables


def test_config_check_prints_the_settings(tmp_path):
    result = run_parley(["-c", str(ROOT / "config.example.toml"), "config", "check"])
    assert result.returncode == 0
    assert "quantization = 'auto'" in result.stdout


@pytest.mark.slow
def test_chat_with_the_embedded_model(tmp_path):
    """The README's example, on the real SmolLM2-135M-Instruct."""
    db = tmp_path / "p.db"
    config = str(write_config(tmp_path / "c.toml", "embedded", db, max_new_tokens="40"))
    first = run_parley(["-c", config, "chat"], stdin="My name is Ada.\n/exit\n", timeout=600)
    assert first.returncode == 0, first.stderr
    reply = first.stdout.split("Parley: ", 1)[1].strip()
    assert len(reply) > 2
    second = run_parley(["-c", config, "chat"], stdin="What is my name?\n/exit\n", timeout=600)
    assert second.returncode == 0, second.stderr
    assert "Parley: " in second.stdout
    prompt = job_prompts(db)[1]
    assert [m["content"] for m in prompt if m["role"] == "user"] == ["My name is Ada.", "What is my name?"]
    assert prompt[2] == {"role": "assistant", "content": reply}


def test_log_lines_never_show_a_token_from_the_environment(tmp_path, monkeypatch):
    import logging

    from bot.runtime.logs import setup_logging as _setup_logging
    from bot.core.config import parse_settings

    token = "123456:AAF-secret-token-value"
    monkeypatch.setenv("PARLEY_TEST_TG", token)
    settings = parse_settings({"telegram": {"token_env": "PARLEY_TEST_TG"}, "bot": {"log_file": str(tmp_path / "log")}})
    _setup_logging(settings, quiet=False, verbose=True)
    try:
        log = logging.getLogger("parley.test")
        log.info("calling https://api.telegram.org/bot%s/getMe", token)
        try:
            raise RuntimeError(f"connection to https://api.telegram.org/bot{token}/getUpdates failed")
        except RuntimeError:
            log.exception("request failed")
    finally:
        for handler in logging.getLogger().handlers:
            handler.flush()
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    written = (tmp_path / "log").read_text()
    assert "calling https://api.telegram.org/bot***/getMe" in written
    assert "bot***/getUpdates failed" in written and token not in written

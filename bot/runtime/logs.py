"""Logging for the bot process: one format, ` job=N` on lines written while a job is worked on,
and every secret Parley holds redacted from every line, whatever library wrote it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from bot.core.config import Settings
from bot.core.context import current_job

__all__ = ["setup_logging", "Redactor", "RedactingFormatter", "JobContext"]


class Redactor:
    """Replaces every secret Parley holds with "***" in a text (longest first, so a secret that
    contains another is hidden whole). Secrets shorter than 6 characters are not hunted: they
    would blank out ordinary words."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class RedactingFormatter(logging.Formatter):
    """Every log line, tracebacks included, whatever library wrote it, through a `Redactor`."""

    def __init__(self, fmt: str, redact: Redactor) -> None:
        super().__init__(fmt)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JobContext(logging.Filter):
    """Adds ` job=N` to log lines written while a job is being worked on."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = current_job.get()
        record.job = f" job={job}" if job is not None else ""
        return True


def setup_logging(settings: Settings, *, quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else getattr(logging, settings.bot.log_level))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings.bot.log_file:
        handlers.append(logging.FileHandler(settings.bot.log_file, encoding="utf-8"))
    formatter = RedactingFormatter("%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s", Redactor(settings.secret_values()))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(JobContext())
    logging.basicConfig(level=level, handlers=handlers, force=True)
    # httpx logs every request URL at INFO, and Telegram's URLs carry the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)

"""Helpers shared by the test modules."""

from __future__ import annotations

from pathlib import Path

from bot.core.config import Settings, parse_settings


def make_settings(model_dir: Path, tmp_path: Path, **sections: dict) -> Settings:
    """Settings on the tiny model, a fresh SQLite file in tmp_path, greedy short replies."""
    data: dict[str, dict] = {
        "model": {"model": str(model_dir), "device": "cpu", "quantization": "none", "dtype": "float32"},
        "storage": {"url": f"sqlite+aiosqlite:///{tmp_path}/parley.db"},
        "generation": {"max_new_tokens": 6, "temperature": 0.0},
        "worker": {"max_batch": 4},
        "bot": {"system_prompt": "You are a test bot."},
        # Tests that are not about these limits send many messages as one user.
        "queue": {"max_pending_per_user": 100, "user_messages_per_minute": 1000},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_settings(data)


async def jobs_of(app, conversation_id: int) -> list:  # noqa: ANN001
    """Every job of a conversation, oldest first, read straight from the database."""
    from sqlalchemy import select

    from storage import Job

    async with app.database.sessions() as session:
        return list((await session.scalars(select(Job).where(Job.conversation_id == conversation_id).order_by(Job.id))).all())


async def running_jobs(repo) -> list:  # noqa: ANN001
    """Every running job in the repository's database, oldest first (any owner)."""
    from sqlalchemy import select

    from bot.core.types import JobStatus
    from storage import Job

    async with repo._sessions() as session:
        return list((await session.scalars(select(Job).where(Job.status == JobStatus.RUNNING).order_by(Job.id))).all())

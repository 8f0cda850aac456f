"""Helpers shared by the test modules."""

from __future__ import annotations

from pathlib import Path

from bot.core.config import Settings, parse_settings
from bot.generation.client import GenerationClient


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


class ScriptedClient(GenerationClient):
    """A generation backend that answers from a script, for tests about how replies stream, stop
    and go on. Each fresh request gets the next sample (`sample(n)`: its pieces; by default
    "s<n>w1", " s<n>w2", … 40 of them); a request whose chat ends with an assistant message
    continues the sample that text begins, from exactly where it ends. At most `max_new_tokens`
    pieces a request ("length" when more were left). `cancel` ends a stream at its next step;
    with `hold_after`, each stream waits after that many pieces until `release` is set."""

    def __init__(self, sample=None, *, pause: float = 0.01, hold_after: int | None = None) -> None:  # noqa: ANN001
        import asyncio

        from bot.generation.client import ModelInfo

        self.sample = sample or (lambda n: [f"s{n}w1", *(f" s{n}w{i}" for i in range(2, 41))])
        self.pause = pause
        self.hold_after = hold_after
        self.release = asyncio.Event()
        self.requests: list = []
        """Every `GenerationRequest` submitted, in order."""
        self.samples: list[list[str]] = []
        self._cancelled: dict[int, asyncio.Event] = {}
        self._info = ModelInfo("scripted", "none", "cpu", "float32", context_window=4096, max_batch=4)

    async def start(self):  # noqa: ANN201
        return self._info

    async def stop(self) -> None:
        return None

    def _pieces_for(self, request) -> list[str]:  # noqa: ANN001
        last = request.messages[-1] if request.messages else None
        if last is not None and last.role == "assistant":
            for pieces in self.samples:
                full, done = "", 0
                for piece in pieces:
                    if len(full) >= len(last.content):
                        break
                    full += piece
                    done += 1
                if full.startswith(last.content):
                    rest = full[len(last.content):]
                    return ([rest] if rest else []) + pieces[done:]
            raise AssertionError(f"nothing to continue from {last.content!r}")
        pieces = list(self.sample(len(self.samples) + 1))
        self.samples.append(pieces)
        return pieces

    async def submit(self, request):  # noqa: ANN001, ANN201 - an async iterator of deltas
        import asyncio

        from bot.generation.client import GenerationResult, TextDelta

        self.requests.append(request)
        cancelled = self._cancelled.setdefault(request.job_id, asyncio.Event())
        pieces = self._pieces_for(request)
        limit = request.settings.max_new_tokens
        for n, piece in enumerate(pieces[:limit]):
            if self.hold_after is not None and n == self.hold_after:
                waits = [asyncio.ensure_future(self.release.wait()), asyncio.ensure_future(cancelled.wait())]
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
            await asyncio.sleep(self.pause)
            if cancelled.is_set():
                yield GenerationResult("cancelled", prompt_tokens=1, completion_tokens=n)
                return
            yield TextDelta(piece)
        reason = "length" if len(pieces) > limit else "stop"
        yield GenerationResult(reason, prompt_tokens=1, completion_tokens=min(limit, len(pieces)))

    async def cancel(self, job_id: int) -> None:
        import asyncio

        self._cancelled.setdefault(job_id, asyncio.Event()).set()

    async def health(self):  # noqa: ANN201
        from bot.generation.client import BackendHealth

        return BackendHealth(alive=True, model=self._info, running_jobs=0)

    @property
    def model_info(self):  # noqa: ANN201
        return self._info

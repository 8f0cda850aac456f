"""Reply streams against a slow or refusing platform.

A platform posts a message the moment the request arrives and answers with its id later, so a
render cut off mid-send would leave a message whose id nobody kept: every render in flight is
finished, never cancelled, and every id is persisted before the next send (a restart edits those
messages instead of posting them again). A platform that refuses an edit gets it again, with
backoff; one that keeps refusing gets the final text as a new message. The final text is stored
whatever its delivery meets; a job fails only when nothing of it could be shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from adapters.base import EditingReplyStream, EditThrottle, split_message
from adapters.fake import FakeAdapter
from bot.core.contracts import Outcome
from bot.core.types import ConversationKey, JobStatus
from bot.generation.client import BackendHealth, GenerationClient, GenerationResult, ModelInfo, TextDelta
from bot.runtime.app import ParleyApp
from tests.support import jobs_of, make_settings


class Refused(Exception):
    """What the platform answers to a call it refuses (Discord's 403, Telegram's Forbidden)."""


class SlowPlatform:
    """The far end of a chat. A message is posted when the request arrives and its id answered
    `delay` seconds later. At every send it notes whether each id answered before was persisted."""

    def __init__(self, delay: float = 0.0, *, refuse_edits: int = 0, refuse_sends: int = 0) -> None:
        self.delay = delay
        self.refuse_edits = refuse_edits
        self.refuse_sends = refuse_sends
        self.refuse_edits_of: set[str] = set()  # messages that refuse every edit
        self.posted: list[str] = []  # ids, in posting order
        self.texts: dict[str, str] = {}  # id → what the message shows now
        self.answered: list[str] = []  # ids whose answer reached the bot
        self.persisted: list[list[str]] = []  # every list of ids the bot saved, in order
        self.unsaved_at_send: list[list[str]] = []  # ids not yet saved when the next send came
        self.edit_calls = 0

    async def persist(self, ids: Sequence[str]) -> None:
        self.persisted.append(list(ids))

    async def send(self, chunk: str) -> str:
        saved = self.persisted[-1] if self.persisted else []
        unsaved = [i for i in self.answered if i not in saved]
        if unsaved:
            self.unsaved_at_send.append(unsaved)
        if self.refuse_sends:
            self.refuse_sends -= 1
            raise Refused("403: Missing Permissions")
        message_id = f"m{len(self.posted) + 1}"
        self.posted.append(message_id)
        self.texts[message_id] = chunk
        await asyncio.sleep(self.delay)
        self.answered.append(message_id)
        return message_id

    async def edit(self, message_id: str, chunk: str) -> None:
        self.edit_calls += 1
        if message_id in self.refuse_edits_of:
            raise Refused("403: Missing Permissions")
        if self.refuse_edits:
            self.refuse_edits -= 1
            raise Refused("403: Missing Permissions")
        self.texts[message_id] = chunk


class SlowStream(EditingReplyStream):
    retry_delays = (0.01, 0.02, 0.03)

    def __init__(self, platform: SlowPlatform, limit: int = 20, *, interval: float = 0.01, resume: Sequence[str] = ()) -> None:
        super().__init__(EditThrottle(interval), "chat", resume)
        self.platform = platform
        self.limit = limit

    def split(self, text: str) -> list[str]:
        return split_message(text, self.limit)

    async def send(self, chunk: str, index: int) -> str:
        return await self.platform.send(chunk)

    async def edit(self, message_id: object, chunk: str) -> None:
        await self.platform.edit(str(message_id), chunk)


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
TEXT = " ".join(WORDS)


async def test_a_send_in_flight_is_finished_not_cut_off_and_every_id_is_saved_before_the_next():
    platform = SlowPlatform(delay=0.3)
    stream = SlowStream(platform)
    stream.on_posted = platform.persist
    await stream.update(" ".join(WORDS[:2]))  # the first message, at once
    await stream.update(" ".join(WORDS[:6]))  # a throttled render: edits the first, posts the second...
    await asyncio.sleep(0.1)  # ...whose id is still on its way when the reply is finished
    ids = await stream.finish(TEXT)
    chunks = split_message(TEXT, 20)
    assert len(platform.posted) == len(chunks), f"a chunk was posted twice: {platform.posted}"
    assert ids == platform.posted
    assert [platform.texts[i] for i in ids] == chunks
    assert platform.unsaved_at_send == []  # each id saved before the next send, during finish too
    assert platform.persisted[-1] == ids


async def test_a_render_waiting_out_the_edit_interval_is_dropped_by_finish():
    platform = SlowPlatform()
    stream = SlowStream(platform, interval=30.0)
    await stream.update("alpha")
    await stream.update("alpha beta")
    await stream.update("alpha beta gamma")  # its render would wait 30 s for the edit interval
    ids = await asyncio.wait_for(stream.finish("alpha beta gamma delta"), 2)
    assert [platform.texts[i] for i in ids] == ["alpha beta gamma", "delta"]


async def test_a_refused_final_edit_is_tried_again():
    platform = SlowPlatform(refuse_edits=1)
    stream = SlowStream(platform, limit=100)
    await stream.update("Hello")
    ids = await stream.finish("Hello world")
    assert ids == platform.posted == ["m1"] and platform.texts["m1"] == "Hello world"
    assert platform.edit_calls == 2


async def test_edits_refused_for_good_end_in_the_text_posted_anew():
    platform = SlowPlatform(refuse_edits=1_000)
    stream = SlowStream(platform)
    stream.on_posted = platform.persist
    await stream.update("alpha beta")
    await stream.update("alpha beta gamma")  # refused in the background: no error surfaces
    await asyncio.sleep(0.05)
    ids = await stream.finish(TEXT)
    assert [platform.texts[i] for i in ids] == split_message(TEXT, 20)
    assert "m1" not in ids and platform.texts["m1"] == "alpha beta"  # left as it was
    assert platform.persisted[-1] == ids


async def test_after_a_message_that_refuses_edits_the_text_is_posted_anew_in_order():
    platform = SlowPlatform()
    stream = SlowStream(platform)
    await stream.update("alpha beta gam delta epsilon zeta")  # two messages: m1, m2
    platform.refuse_edits_of.add("m1")
    ids = await stream.finish(TEXT)
    assert ids == platform.posted[2:]  # every chunk anew, below the two given up on
    assert [platform.texts[i] for i in ids] == split_message(TEXT, 20)
    assert platform.texts["m2"] == "…" and stream.superseded == ["m1", "m2"]


async def test_a_platform_that_refuses_everything_raises_only_when_finishing():
    platform = SlowPlatform(refuse_sends=1_000)
    stream = SlowStream(platform)
    await stream.update("alpha")  # refused: the reply goes on streaming
    await stream.update("alpha beta")
    with pytest.raises(Refused):
        await stream.finish("alpha beta gamma")
    assert stream.posted_ids == []


# -- through the app: the attempt persists ids and stores the reply ---------------------------------


class ScriptedClient(GenerationClient):
    """A backend that streams the same words for every job, one delta every `pause` seconds."""

    def __init__(self, words: Sequence[str], pause: float = 0.02) -> None:
        self.words = list(words)
        self.pause = pause
        self._info = ModelInfo("scripted", "none", "cpu", "float32", context_window=4096, max_batch=4)

    async def start(self) -> ModelInfo:
        return self._info

    async def stop(self) -> None:
        return None

    async def submit(self, request):  # noqa: ANN001, ANN201 - an async iterator of deltas
        for n, word in enumerate(self.words):
            await asyncio.sleep(self.pause)
            yield TextDelta(word if n == 0 else f" {word}")
        yield GenerationResult("stop", prompt_tokens=1, completion_tokens=len(self.words))

    async def cancel(self, job_id: int) -> None:
        return None

    async def health(self) -> BackendHealth:
        return BackendHealth(alive=True, model=self._info, running_jobs=0)

    @property
    def model_info(self) -> ModelInfo:
        return self._info


class SlowPlatformAdapter(FakeAdapter):
    """The fake adapter, with replies streamed into a `SlowPlatform` by an `EditingReplyStream`."""

    def __init__(self, platform: SlowPlatform) -> None:
        super().__init__()
        self.far_end = platform

    async def open_reply(self, conversation: ConversationKey, reply_to: str | None, resume: Sequence[str] = ()):  # noqa: ANN201
        return SlowStream(self.far_end, resume=resume)


async def run_one_job(tmp_path: Path, platform: SlowPlatform):  # noqa: ANN201
    settings = make_settings(Path("unused"), tmp_path)
    adapter = SlowPlatformAdapter(platform)
    async with ParleyApp(settings, [adapter], client=ScriptedClient(WORDS)) as app:
        save = app.repo.set_reply_platform_ids

        async def saving(job_id: int, ids: Sequence[str]) -> None:
            await save(job_id, ids)
            await platform.persist(ids)

        app.repo.set_reply_platform_ids = saving  # type: ignore[method-assign]
        result = await adapter.say("tell me the letters", direct=True, chat="dm")
        assert result.outcome is Outcome.QUEUED
        status = await asyncio.wait_for(app.router.wait_for(result.job_id), 30)
        job = await app.repo.get_job(result.job_id)
        history = await app.repo.history(job.conversation_id)
        [job] = await jobs_of(app, job.conversation_id)
        stored = await app.repo.get_message(job.reply_message_id) if job.reply_message_id else None
        return status, job, history, stored


async def test_every_posted_id_is_persisted_before_the_next_send_and_none_is_posted_twice(tmp_path):
    platform = SlowPlatform(delay=0.2)
    status, job, history, stored = await run_one_job(tmp_path, platform)
    chunks = split_message(TEXT, 20)
    assert status == JobStatus.DONE.value
    assert len(platform.posted) == len(chunks), f"a chunk was posted twice: {platform.posted}"
    assert platform.unsaved_at_send == []
    assert job.reply_platform_ids == platform.posted
    assert [platform.texts[i] for i in platform.posted] == chunks
    assert [(m.role, m.text) for m in history][-1] == ("assistant", TEXT)


async def test_a_platform_refusing_every_edit_still_shows_and_stores_the_reply(tmp_path):
    platform = SlowPlatform(refuse_edits=1_000)
    status, job, history, stored = await run_one_job(tmp_path, platform)
    assert status == JobStatus.DONE.value, job.error
    assert [(m.role, m.text) for m in history][-1] == ("assistant", TEXT)
    shown = [platform.texts[i] for i in job.reply_platform_ids]
    assert shown == split_message(TEXT, 20)  # posted anew, since the first message could not be edited


async def test_a_platform_refusing_everything_fails_the_job_with_a_reason(tmp_path):
    platform = SlowPlatform(refuse_sends=1_000)
    status, job, history, stored = await run_one_job(tmp_path, platform)
    assert status == JobStatus.FAILED.value
    assert "could not be shown" in (job.error or "")
    assert [m.role for m in history] == ["user"]  # an answer nobody saw is not in the history...
    assert stored is not None and stored.text == TEXT and stored.archived  # ...but it is kept

"""Reply controls on Telegram (Stop, Regenerate, Continue as inline keyboard buttons) and texts a
client split at Telegram's length limit, joined into one question.

The real python-telegram-bot Application against the loopback fake Bot API
(tests/fakes/telegram_api.py), through Parley's real router, queue and storage; the model is a
scripted generation client, slow enough that a reply is still streaming when Stop is pressed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.telegram import TelegramAdapter
from bot.core.contracts import Control, Outcome, RouteResult
from bot.core.types import ConversationKey
from bot.generation.client import BackendHealth, GenerationClient, GenerationResult, ModelInfo, TextDelta
from bot.runtime.app import ParleyApp
from tests.support import jobs_of
from tests.test_telegram import conversation_of, fake, telegram_settings  # noqa: F401  (fixture)

UNUSED_MODEL = Path("unused")


class ScriptedClient(GenerationClient):
    """A backend that streams scripted replies, one word every `pause` seconds: reply n of the
    script for the n-th job (the last one again after that). Honours `cancel` at the next word."""

    def __init__(self, *replies: str, pause: float = 0.05, finish_reason: str = "stop") -> None:
        self.replies = [reply.split() for reply in replies]
        self.pause = pause
        self.finish_reason = finish_reason
        self.requests: list = []
        self._cancelled: set[int] = set()
        self._info = ModelInfo("scripted", "none", "cpu", "float32", context_window=4096, max_batch=4)

    async def start(self) -> ModelInfo:
        return self._info

    async def stop(self) -> None:
        return None

    async def submit(self, request):  # noqa: ANN001, ANN201 - an async iterator of deltas
        self.requests.append(request)
        words = self.replies[min(len(self.requests), len(self.replies)) - 1]
        for n, word in enumerate(words):
            await asyncio.sleep(self.pause)
            if request.job_id in self._cancelled:
                yield GenerationResult("cancelled", prompt_tokens=1, completion_tokens=n)
                return
            continuing = request.messages[-1].role == "assistant"  # Continue: the model goes on from it
            yield TextDelta(word if n == 0 and not continuing else f" {word}")
        yield GenerationResult(self.finish_reason, prompt_tokens=1, completion_tokens=len(words))

    async def cancel(self, job_id: int) -> None:
        self._cancelled.add(job_id)

    async def health(self) -> BackendHealth:
        return BackendHealth(alive=True, model=self._info, running_jobs=0)

    @property
    def model_info(self) -> ModelInfo:
        return self._info


def words(prefix: str, count: int) -> str:
    return " ".join(f"{prefix}{n}" for n in range(count))


async def start_with(settings, client: GenerationClient):
    adapter = TelegramAdapter.from_config(settings)
    app = ParleyApp(settings, [adapter], client=client)
    await app.start()
    return app, adapter


@pytest.fixture
def settings(fake, tmp_path):  # noqa: F811
    return telegram_settings(UNUSED_MODEL, tmp_path, fake)


async def keyboard_on(fake, chat_id: int, *, starting: str, timeout: float = 10.0) -> tuple[dict, list[str]]:
    """Wait until one of the bot's messages in the chat shows a button whose data starts with
    `starting`; that message and its buttons' data."""

    def find():
        for message in fake.bot_messages(chat_id):
            data = fake.keyboard_of(chat_id, message["message_id"])
            if any(d.startswith(starting) for d in data):
                return message, data
        return None

    return await fake.wait_for(find, timeout)


def job_of(data: list[str]) -> int:
    return int(data[0].rsplit(":", 1)[1])


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for state the fake does not record (what a stand-in core was handed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def answer_to(fake, update: dict, timeout: float = 10.0):
    query = update["callback_query"]["id"]
    return await fake.wait_for(lambda: next((a for a in fake.answers if a.query_id == query), None), timeout)


# -- Stop ------------------------------------------------------------------------------------------


async def test_stop_mid_stream_ends_the_reply_keeps_it_and_offers_regenerate(fake, settings):
    app, _ = await start_with(settings, ScriptedClient(words("w", 200), pause=0.05))
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "tell me a long story")
        message, data = await keyboard_on(fake, user["id"], starting="p:stop:")
        job_id = job_of(data)
        assert [b["text"] for row in message["reply_markup"]["inline_keyboard"] for b in row] == ["⏹ Stop"]
        press = fake.add_callback_query(user, message, f"p:stop:{job_id}")
        answer = await answer_to(fake, press)
        assert answer.show_alert is False
        assert await asyncio.wait_for(app.router.wait_for(job_id), 20) == "cancelled"
        await fake.wait_for(lambda: fake.keyboard_of(user["id"], message["message_id"]) == [f"p:regen:{job_id}"])
        [shown] = fake.messages_in(user["id"])
        assert shown.endswith("[stopped]") and "w199" not in shown  # cut short, what was shown kept
        conversation = await conversation_of(app, str(user["id"]), direct=True)
        history = await app.repo.history(conversation.id)
        assert [m.role for m in history] == ["user", "assistant"] and history[1].text == shown
    finally:
        await app.stop()


async def test_only_the_asker_or_an_admin_may_stop_a_reply_in_a_group(fake, settings):
    app, _ = await start_with(settings, ScriptedClient(words("w", 40), pause=0.05))
    try:
        group = fake.make_supergroup()
        ann, bob = fake.make_user("Ann"), fake.make_user("Bob")
        fake.set_member_status(group["id"], bob["id"], "member")
        fake.add_group_message(group, ann, "@parley_bot count for me")
        message, data = await keyboard_on(fake, group["id"], starting="p:stop:")
        job_id = job_of(data)
        press = fake.add_callback_query(bob, message, f"p:stop:{job_id}")
        answer = await answer_to(fake, press)
        assert answer.text and "admin" in answer.text and answer.show_alert is False
        assert await asyncio.wait_for(app.router.wait_for(job_id), 20) == "done"
        assert fake.messages_in(group["id"]) == [words("w", 40)]  # it went on to the end
        assert fake.keyboard_of(group["id"], message["message_id"]) == [f"p:regen:{job_id}"]
        assert fake.calls_to("getChatMember")  # whether Bob administers the group was asked
    finally:
        await app.stop()


async def test_an_admin_may_stop_someone_elses_reply(fake, settings):
    app, _ = await start_with(settings, ScriptedClient(words("w", 200), pause=0.05))
    try:
        group = fake.make_supergroup()
        ann, boss = fake.make_user("Ann"), fake.make_user("Boss")
        fake.set_member_status(group["id"], boss["id"], "administrator")
        fake.add_group_message(group, ann, "@parley_bot count for me")
        message, data = await keyboard_on(fake, group["id"], starting="p:stop:")
        press = fake.add_callback_query(boss, message, data[0])
        await answer_to(fake, press)
        assert await asyncio.wait_for(app.router.wait_for(job_of(data)), 20) == "cancelled"
    finally:
        await app.stop()


# -- Regenerate and Continue ------------------------------------------------------------------------


async def test_regenerate_replaces_the_reply_in_place_and_a_double_tap_runs_once(fake, settings):
    client = ScriptedClient("first answer here", "second answer instead", pause=0.02)
    app, _ = await start_with(settings, client)
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "hello")
        message, data = await keyboard_on(fake, user["id"], starting="p:regen:")
        assert fake.messages_in(user["id"]) == ["first answer here"]
        # A double tap: two presses (two queries) and one of them delivered twice.
        first = fake.add_callback_query(user, message, data[0])
        second = fake.add_callback_query(user, message, data[0])
        fake.redeliver(first)
        await answer_to(fake, first)
        await answer_to(fake, second)
        await fake.wait_for(lambda: fake.messages_in(user["id"]) == ["second answer instead"], timeout=20)
        await app.queue.run_until_empty()
        await asyncio.sleep(0.3)
        assert len(fake.sent) == 1  # edited in place, never posted anew
        assert len(client.requests) == 2
        conversation = await conversation_of(app, str(user["id"]), direct=True)
        assert len(await jobs_of(app, conversation.id)) == 2
        [_, new] = await jobs_of(app, conversation.id)
        assert fake.keyboard_of(user["id"], message["message_id"]) == [f"p:regen:{new.id}"]
        assert [m.text for m in await app.repo.history(conversation.id)] == ["hello", "second answer instead"]
    finally:
        await app.stop()


async def test_continue_after_a_length_cut_appends_to_the_same_reply(fake, settings):
    client = ScriptedClient("the first half", "and the second", pause=0.02, finish_reason="length")
    app, _ = await start_with(settings, client)
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "hello")
        message, data = await keyboard_on(fake, user["id"], starting="p:cont:")
        job_id = job_of(data)
        assert data == [f"p:regen:{job_id}", f"p:cont:{job_id}"]
        press = fake.add_callback_query(user, message, f"p:cont:{job_id}")
        await answer_to(fake, press)
        await fake.wait_for(lambda: fake.messages_in(user["id"]) == ["the first half and the second"], timeout=20)
        await app.queue.run_until_empty()
        assert len(fake.sent) == 1
    finally:
        await app.stop()


async def test_a_newer_reply_takes_the_controls_from_the_older_one(fake, settings):
    app, _ = await start_with(settings, ScriptedClient("one answer", pause=0.02))
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "first question")
        first, _ = await keyboard_on(fake, user["id"], starting="p:regen:")
        fake.add_private_message(user, "second question")
        await fake.wait_for(lambda: len(fake.sent) == 2, timeout=20)
        await app.queue.run_until_empty()
        second = fake.sent[1].message
        await fake.wait_for(lambda: fake.keyboard_of(user["id"], first["message_id"]) == [], timeout=10)
        assert fake.keyboard_of(user["id"], second["message_id"])[0].startswith("p:regen:")
        # A press on the older reply (a client that had not redrawn it yet) is refused politely.
        press = fake.add_callback_query(user, first, f"p:regen:{job_of(fake.keyboard_of(user['id'], second['message_id'])) - 1}")
        answer = await answer_to(fake, press)
        assert answer.text
    finally:
        await app.stop()


async def test_a_press_after_a_reset_says_the_conversation_was_reset(fake, settings):
    app, _ = await start_with(settings, ScriptedClient("an answer", pause=0.02))
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "hello")
        message, data = await keyboard_on(fake, user["id"], starting="p:regen:")
        fake.add_private_message(user, "/reset")
        await fake.wait_for(lambda: any(s.text.startswith("History cleared") for s in fake.sent), timeout=10)
        press = fake.add_callback_query(user, message, data[0])
        answer = await answer_to(fake, press)
        assert answer.text and "reset" in answer.text.lower()
    finally:
        await app.stop()


async def test_controls_keep_working_after_a_restart(fake, settings):
    app, _ = await start_with(settings, ScriptedClient("before the restart", pause=0.02))
    user = fake.make_user("Ann")
    try:
        fake.add_private_message(user, "hello")
        message, data = await keyboard_on(fake, user["id"], starting="p:regen:")
        await app.queue.run_until_empty()
    finally:
        await app.stop()
    app, _ = await start_with(settings, ScriptedClient("after the restart", pause=0.02))
    try:
        press = fake.add_callback_query(user, message, data[0])
        await answer_to(fake, press)
        await fake.wait_for(lambda: fake.messages_in(user["id"]) == ["after the restart"], timeout=20)
        assert len(fake.sent) == 1
    finally:
        await app.stop()


async def test_malformed_or_foreign_button_data_is_answered_without_harm(fake, settings):
    app, _ = await start_with(settings, ScriptedClient("an answer", pause=0.02))
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "hello")
        message, _ = await keyboard_on(fake, user["id"], starting="p:regen:")
        presses = [
            fake.add_callback_query(user, message, data)
            for data in ("garbage", "p:stop:notanumber", "p:zap:1", "p:regen:", "x:regen:1", "p:regen:99999")
        ]
        for press in presses:
            await answer_to(fake, press)
        fake.add_private_message(user, "still there?")
        await fake.wait_for(lambda: len(fake.sent) == 2, timeout=20)
        await fake.wait_for(lambda: not fake.pending_updates, timeout=5)  # every press confirmed
    finally:
        await app.stop()


# -- rendering, with the adapter's own reply streams ------------------------------------------------


async def test_the_keyboard_rides_on_the_last_message_and_moves_when_the_reply_grows(fake, settings):
    app, adapter = await start_with(settings, ScriptedClient("unused", pause=0.02))
    try:
        user = fake.make_user("Ann")
        chat = fake.private_chat(user)
        stream = await adapter.open_reply(ConversationKey("telegram", str(chat["id"])), None)
        stream.job_id = 7
        await stream.set_controls([Control.STOP])
        await stream.update("short start")
        [first] = fake.sent
        assert fake.keyboard_of(chat["id"], first.message_id) == ["p:stop:7"]
        long_text = "word " * 1000  # two messages
        await stream.update(long_text)
        await fake.wait_for(lambda: len(fake.sent) == 2, timeout=10)
        await asyncio.sleep(0.3)
        second = fake.sent[1]
        assert fake.keyboard_of(chat["id"], second.message_id) == ["p:stop:7"]
        assert fake.keyboard_of(chat["id"], first.message_id) == []
        edits_before = len(fake.edits)
        await stream.set_controls([Control.REGENERATE, Control.CONTINUE])
        await stream.finish(long_text)  # the text is as shown: only the keyboard changes
        assert len(fake.edits) == edits_before
        assert fake.markup_edits[-1][1] == second.message_id
        assert fake.keyboard_of(chat["id"], second.message_id) == ["p:regen:7", "p:cont:7"]
        assert fake.keyboard_of(chat["id"], first.message_id) == []
        # A failed reply shows no controls.
        failing = await adapter.open_reply(ConversationKey("telegram", str(chat["id"])), None)
        failing.job_id = 8
        await failing.set_controls([Control.STOP])
        await failing.update("partial")
        await failing.fail("Something went wrong.")
        assert fake.keyboard_of(chat["id"], fake.sent[-1].message_id) == []
        # clear_controls is best effort: a message gone is no error.
        await adapter.clear_controls(ConversationKey("telegram", str(chat["id"])), [str(second.message_id), "999999"])
        assert fake.keyboard_of(chat["id"], second.message_id) == []
    finally:
        await app.stop()


class RecordingCore:
    """A stand-in core for the adapter alone: records what it is handed, answers presses as told."""

    def __init__(self, answer: RouteResult = RouteResult(Outcome.COMMAND, reply="Stopped.")) -> None:
        self.answer = answer
        self.messages: list = []
        self.claimed: list = []
        self.presses: list = []
        self._seen: set[tuple] = set()

    def set_bot_username(self, platform, username):  # noqa: ANN001, ANN201
        return None

    async def handle_update(self, message):  # noqa: ANN001, ANN201
        key = (message.conversation, message.message_id)
        if key in self._seen:
            return RouteResult(Outcome.DUPLICATE)
        self._seen.add(key)
        self.messages.append(message)
        return RouteResult(Outcome.RECORDED)

    async def claim_update(self, message):  # noqa: ANN001, ANN201
        self.claimed.append(message)
        key = (message.conversation, message.message_id)
        fresh = key not in self._seen
        self._seen.add(key)
        return fresh

    async def press(self, press):  # noqa: ANN001, ANN201
        self.presses.append(press)
        return self.answer


async def test_a_press_carries_who_where_and_which_control(fake, settings):
    adapter = TelegramAdapter.from_config(settings)
    core = RecordingCore(RouteResult(Outcome.REFUSED, reply="x" * 300, private=True))
    await adapter.start(core)
    try:
        forum = fake.make_forum()
        topic = fake.create_topic(forum, "talk")
        ann = fake.make_user("Ann")
        fake.set_member_status(forum["id"], ann["id"], "member")
        stream = await adapter.open_reply(ConversationKey("telegram", f"{forum['id']}:{topic}"), None)
        stream.job_id = 41
        await stream.set_controls([Control.STOP])
        await stream.finish("a reply in a topic")
        message = fake.sent[-1].message
        press = fake.add_callback_query(ann, message, "p:stop:41")
        answer = await answer_to(fake, press)
        assert len(answer.text) == 200  # Telegram's limit for a callback answer
        [seen] = core.presses
        assert seen.conversation == ConversationKey("telegram", f"{forum['id']}:{topic}")
        assert (seen.job_id, seen.control, seen.press_id, seen.is_direct) == (41, Control.STOP, press["callback_query"]["id"], False)
        assert seen.author.id == str(ann["id"]) and seen.author.is_admin is False
        # In a private chat the presser is direct and counts as admin there.
        private = fake.private_chat(ann)
        mine = await adapter.open_reply(ConversationKey("telegram", str(private["id"])), None)
        mine.job_id = 42
        await mine.set_controls([Control.REGENERATE])
        await mine.finish("hello")
        press = fake.add_callback_query(ann, fake.sent[-1].message, "p:regen:42")
        await answer_to(fake, press)
        assert core.presses[-1].is_direct and core.presses[-1].author.is_admin
        assert core.presses[-1].control is Control.REGENERATE
    finally:
        await adapter.stop()


# -- texts split by the client ----------------------------------------------------------------------


async def test_a_text_split_at_the_limit_is_one_question(fake, settings):
    adapter = TelegramAdapter.from_config(settings)
    core = RecordingCore()
    await adapter.start(core)
    try:
        ann, bob = fake.make_user("Ann"), fake.make_user("Bob")
        first = fake.add_private_message(ann, "a" * 4096)
        second = fake.add_private_message(ann, "b" * 1500)
        other = fake.add_private_message(bob, "c" * 4096)  # alone: answered after the wait
        await until(lambda: len(core.messages) == 2)
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)
        joined = next(m for m in core.messages if m.author.id == str(ann["id"]))
        assert joined.text == "a" * 4096 + "b" * 1500
        assert joined.message_id == str(first["message"]["message_id"])
        assert [m.message_id for m in core.claimed] == [str(second["message"]["message_id"])]
        assert next(m for m in core.messages if m.author.id == str(bob["id"])).text == "c" * 4096
        # Telegram delivering them again: nothing is answered twice.
        fake.redeliver(first, second, other)
        await fake.wait_for(lambda: not fake.pending_updates, timeout=10)
        await asyncio.sleep(0.2)
        assert len(core.messages) == 2
    finally:
        await adapter.stop()


async def test_parts_cut_at_a_space_are_joined_with_one_and_others_are_left_alone(fake, settings):
    adapter = TelegramAdapter.from_config(settings)
    core = RecordingCore()
    await adapter.start(core)
    try:
        group = fake.make_supergroup()
        ann, bob, cid = fake.make_user("Ann"), fake.make_user("Bob"), fake.make_user("Cid")
        head = "@parley_bot " + "word " * 800
        fake.add_group_message(group, ann, head.rstrip())
        fake.add_group_message(group, ann, "and the end")
        fake.add_group_message(group, bob, "d" * 4096)
        fake.add_group_message(group, cid, "a separate message")  # another author: no part of Bob's
        await until(lambda: len(core.messages) == 3)
        assert core.messages[0].text == ("word " * 800).rstrip() + " and the end"
        assert core.messages[0].addressed
        assert [m.text for m in core.messages[1:]] == ["d" * 4096, "a separate message"]
        assert len(core.claimed) == 1
    finally:
        await adapter.stop()


async def test_a_long_text_in_two_parts_gets_one_reply(fake, settings):
    app, _ = await start_with(settings, ScriptedClient("one reply", pause=0.02))
    try:
        user = fake.make_user("Ann")
        fake.add_private_message(user, "x" * 4096)
        fake.add_private_message(user, "y" * 1500)
        await fake.wait_for(lambda: fake.sent, timeout=20)
        await app.queue.run_until_empty()
        await asyncio.sleep(0.5)
        assert len(fake.sent) == 1
        conversation = await conversation_of(app, str(user["id"]), direct=True)
        history = await app.repo.history(conversation.id)
        assert [(m.role, len(m.text)) for m in history] == [("user", 5596), ("assistant", len("one reply"))]
    finally:
        await app.stop()

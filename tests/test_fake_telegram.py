"""The fake Telegram Bot API works with the real python-telegram-bot Application.

Every test runs the real PTB client over real HTTP against ``FakeTelegramAPI`` on 127.0.0.1
(CONVENTIONS.md item 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import time
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("telegram", reason="python-telegram-bot is not installed")
pytest.importorskip("aiohttp", reason="aiohttp (the fake server) is not installed")

# Imported after the skips on purpose (httpx comes with python-telegram-bot).
import httpx
from telegram import ChatFullInfo, ChatMemberAdministrator, ChatMemberOwner, Update
from telegram.constants import ChatMemberStatus, MessageEntityType
from telegram.error import (
    BadRequest,
    Conflict,
    EndPointNotFound,
    InvalidToken,
    RetryAfter,
    TimedOut,
)
from telegram.ext import Application, ContextTypes, MessageHandler, filters

from tests.fakes.telegram_api import TINY_PNG, FakeTelegramAPI


@pytest.fixture(autouse=True)
def _ptb_timedelta(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without PTB_TIMEDELTA, PTB 22 issues a PTBDeprecationWarning whenever a time period such
    # as RetryAfter.retry_after is read (even inside RetryAfter.__init__); filterwarnings=error
    # would turn the 429 into that warning instead of RetryAfter.
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegramAPI]:
    async with FakeTelegramAPI(bot_username="parley_bot") as api:
        yield api


def build_application(fake: FakeTelegramAPI, token: str | None = None) -> Application:
    return (
        Application.builder()
        .token(token or fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .build()
    )


@pytest.fixture
def app(fake: FakeTelegramAPI) -> Application:
    return build_application(fake)


@contextlib.asynccontextmanager
async def polling(app: Application, *, timeout: int = 1) -> AsyncIterator[Application]:
    """Run the application the way Parley does: initialize/start/start_polling, then stop."""
    await app.initialize()
    await app.start()
    await app.updater.start_polling(poll_interval=0, timeout=timeout)
    try:
        yield app
    finally:
        await app.updater.stop()
        await app.stop()
        await app.shutdown()


async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.effective_message.reply_text(update.effective_message.text)


# ------------------------------------------------------------------ polling and echo


async def test_echo_round_trip_through_real_application(
    fake: FakeTelegramAPI, app: Application
) -> None:
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    alice = fake.make_user("Alice", username="alice")
    async with polling(app):
        update = fake.add_private_message(alice, "hello there")
        message = await fake.wait_for_message(alice["id"], containing="hello there")

    assert fake.messages_in(alice["id"]) == ["hello there"]
    assert message["from"]["id"] == fake.bot_id
    assert message["chat"]["id"] == update["message"]["chat"]["id"] == alice["id"]
    [sent] = fake.sent
    assert sent.params["chat_id"] == alice["id"]  # form values are decoded to JSON types
    assert "reply_parameters" not in sent.params  # PTB quotes only in groups by default
    methods = [call.method for call in fake.calls]
    assert methods[:2] == ["getMe", "deleteWebhook"]
    assert "getUpdates" in methods
    # stop() confirmed the processed update, so nothing is pending any more
    assert fake.pending_updates == []


async def test_commands_and_mentions_get_entities(fake: FakeTelegramAPI, app: Application) -> None:
    seen: list[Update] = []

    async def record(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(update)

    app.add_handler(MessageHandler(filters.ALL, record))
    group = fake.make_supergroup("Chat room")
    bob = fake.make_user("Bob")
    async with polling(app):
        fake.add_group_message(group, bob, "/ask@parley_bot what is 2+2?")
        fake.add_group_message(group, bob, "hey @parley_bot, hi")
        await fake.wait_for(lambda: len(seen) == 2)

    command, mention = (update.effective_message for update in seen)
    assert command.entities[0].type == MessageEntityType.BOT_COMMAND
    assert command.parse_entity(command.entities[0]) == "/ask@parley_bot"
    assert mention.entities[0].type == MessageEntityType.MENTION
    assert mention.parse_entity(mention.entities[0]) == "@parley_bot"
    assert command.chat.type == "supergroup"


async def test_forum_topic_reply_lands_in_the_topic(
    fake: FakeTelegramAPI, app: Application
) -> None:
    app.add_handler(MessageHandler(filters.TEXT, echo))
    forum = fake.make_forum()
    topic = fake.create_topic(forum, "Questions")
    carol = fake.make_user("Carol")
    async with polling(app):
        update = fake.add_group_message(forum, carol, "in a topic", message_thread_id=topic)
        await fake.wait_for_message(forum["id"], containing="in a topic", thread_id=topic)

    incoming = update["message"]
    assert incoming["is_topic_message"] is True
    # as in Telegram, a topic message that replies to nothing "replies" to the topic's start
    assert incoming["reply_to_message"]["forum_topic_created"]["name"] == "Questions"
    assert fake.messages_in(forum["id"], thread_id=topic) == ["in a topic"]


async def test_long_poll_returns_as_soon_as_an_update_arrives(
    fake: FakeTelegramAPI, app: Application
) -> None:
    app.add_handler(MessageHandler(filters.TEXT, echo))
    dave = fake.make_user("Dave")
    # a 20 s long poll: the reply must not wait for it to time out
    async with polling(app, timeout=20):
        await fake.wait_for_call("deleteWebhook")
        await fake.wait_for(lambda: fake.calls_to("getUpdates"))
        await asyncio.sleep(0.1)  # let the poll settle into waiting
        started = time.monotonic()
        fake.add_private_message(dave, "quick")
        await fake.wait_for_message(dave["id"], containing="quick", timeout=3)
        elapsed = time.monotonic() - started
        stop_started = time.monotonic()
    assert elapsed < 1.0
    assert time.monotonic() - stop_started < 2.0  # stopping cancels the held poll


async def test_long_poll_holds_until_timeout_over_raw_http(fake: FakeTelegramAPI) -> None:
    async with httpx.AsyncClient(base_url=f"{fake.base_url}{fake.token}") as client:
        started = time.monotonic()
        empty = await client.post("/getUpdates", json={"timeout": 0.3})
        held = time.monotonic() - started
        assert empty.json() == {"ok": True, "result": []}
        assert 0.25 <= held < 2.0

        user = fake.make_user("Erin")
        pending = asyncio.create_task(client.post("/getUpdates", data={"timeout": "5"}))
        await asyncio.sleep(0.1)
        first = fake.add_private_message(user, "one")
        response = await asyncio.wait_for(pending, 2)
        assert [u["update_id"] for u in response.json()["result"]] == [first["update_id"]]

        second = fake.add_private_message(user, "two")
        # offset confirms the first update; limit caps the batch
        response = await client.post(
            "/getUpdates", json={"offset": first["update_id"] + 1, "limit": 1, "timeout": 0}
        )
        assert [u["update_id"] for u in response.json()["result"]] == [second["update_id"]]
        assert [u["update_id"] for u in fake.pending_updates] == [second["update_id"]]

        # allowed_updates filters; the setting sticks for later calls
        fake.add_edited_message(second["message"], "two, edited")
        response = await client.post(
            "/getUpdates",
            json={"offset": second["update_id"] + 1, "allowed_updates": ["message"]},
        )
        assert response.json()["result"] == []
        response = await client.post(
            "/getUpdates", json={"allowed_updates": [], "timeout": 0}
        )
        assert "edited_message" in response.json()["result"][0]


async def test_newer_get_updates_terminates_the_waiting_one(fake: FakeTelegramAPI) -> None:
    async with httpx.AsyncClient(base_url=f"{fake.base_url}{fake.token}") as client:
        older = asyncio.create_task(client.post("/getUpdates", json={"timeout": 5}))
        await fake.wait_for(lambda: fake.calls_to("getUpdates"))
        newer = await client.post("/getUpdates", json={"timeout": 0})
        older_response = await asyncio.wait_for(older, 2)
    assert newer.status_code == 200
    assert older_response.status_code == 409
    assert older_response.json()["description"].startswith("Conflict: terminated by other")


async def test_same_update_id_is_delivered_twice(fake: FakeTelegramAPI, app: Application) -> None:
    seen: list[int] = []

    async def record(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(update.update_id)

    app.add_handler(MessageHandler(filters.ALL, record))
    frank = fake.make_user("Frank")
    async with polling(app):
        update = fake.add_private_message(frank, "say it twice")
        await fake.wait_for(lambda: len(seen) == 1)
        fake.add_update(update)  # redelivery of an id the client has already seen
        await fake.wait_for(lambda: len(seen) == 2)
    assert seen == [update["update_id"], update["update_id"]]


async def test_edited_message_update(fake: FakeTelegramAPI, app: Application) -> None:
    edits: list[str] = []

    async def record(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        edits.append(update.edited_message.text)

    app.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, record))
    lee = fake.make_user("Lee")
    async with polling(app):
        original = fake.add_private_message(lee, "helo")
        fake.add_edited_message(original["message"], "hello")
        await fake.wait_for(lambda: edits)
    assert edits == ["hello"]
    assert fake.message(lee["id"], original["message"]["message_id"])["text"] == "hello"


async def test_photo_and_sticker_messages_have_no_text(
    fake: FakeTelegramAPI, app: Application
) -> None:
    seen: list[Update] = []

    async def record(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        seen.append(update)

    app.add_handler(MessageHandler(filters.ALL, record))
    gina = fake.make_user("Gina")
    chat = fake.private_chat(gina)
    async with polling(app):
        fake.add_photo_message(chat, gina, caption="look")
        fake.add_sticker_message(chat, gina, emoji="🙂")
        await fake.wait_for(lambda: len(seen) == 2)
        photo, sticker = (update.effective_message for update in seen)
        assert photo.text is None and photo.caption == "look"
        file = await app.bot.get_file(photo.photo[-1].file_id)
        assert bytes(await file.download_as_bytearray()) == TINY_PNG
    assert sticker.text is None and sticker.sticker.emoji == "🙂"


async def test_privacy_mode_withholds_unaddressed_group_messages() -> None:
    async with FakeTelegramAPI(privacy_mode=True) as private_fake:
        group = private_fake.make_group()
        user = private_fake.make_user("Hal")
        private_fake.add_group_message(group, user, "just chatting")
        mention = private_fake.add_group_message(group, user, "@parley_bot hello")
        command = private_fake.add_group_message(group, user, "/start")
        other_bot = private_fake.add_group_message(group, user, "/start@other_bot")
        queued = [u["update_id"] for u in private_fake.pending_updates]
        assert queued == [mention["update_id"], command["update_id"]]
        assert len(private_fake.withheld) == 2
        assert other_bot in private_fake.withheld
        app = build_application(private_fake)
        async with app:
            me = await app.bot.get_me()
        assert me.can_read_all_group_messages is False


# ------------------------------------------------------------------ sending and editing


async def test_send_and_edit_with_real_bot(fake: FakeTelegramAPI, app: Application) -> None:
    ivy = fake.make_user("Ivy")
    fake.private_chat(ivy)
    async with app:
        draft = await app.bot.send_message(ivy["id"], "thinking…")
        edited = await app.bot.edit_message_text(
            "*done*", chat_id=ivy["id"], message_id=draft.message_id, parse_mode="MarkdownV2"
        )
        assert edited.text == "done"
        assert edited.entities[0].type == MessageEntityType.BOLD
        assert edited.edit_date is not None

        with pytest.raises(BadRequest, match="(?i)message is not modified"):
            await app.bot.edit_message_text(
                "*done*", chat_id=ivy["id"], message_id=draft.message_id, parse_mode="MarkdownV2"
            )
        with pytest.raises(BadRequest, match="(?i)message to edit not found"):
            await app.bot.edit_message_text("x", chat_id=ivy["id"], message_id=999)

        second = await app.bot.send_message(
            ivy["id"], "second", reply_to_message_id=draft.message_id
        )
        assert second.message_id == draft.message_id + 1
        assert second.reply_to_message.message_id == draft.message_id

    assert fake.messages_in(ivy["id"]) == ["done", "second"]
    [edit] = fake.edits
    assert (edit.previous_text, edit.text) == ("thinking…", "done")
    assert [s.text for s in fake.sent] == ["thinking…", "second"]


async def test_send_message_validation(fake: FakeTelegramAPI, app: Application) -> None:
    jo = fake.make_user("Jo")
    fake.private_chat(jo)
    async with app:
        bot = app.bot
        with pytest.raises(BadRequest, match="(?i)message text is empty"):
            await bot.send_message(jo["id"], "")
        with pytest.raises(BadRequest, match="(?i)message is too long"):
            await bot.send_message(jo["id"], "x" * 4097)
        await bot.send_message(jo["id"], "x" * 4096)
        with pytest.raises(BadRequest, match="(?i)chat not found"):
            await bot.send_message(-1001, "hello")
        with pytest.raises(BadRequest, match="(?i)message to be replied not found"):
            await bot.send_message(jo["id"], "hi", reply_to_message_id=12345)
        with pytest.raises(BadRequest, match="(?i)can't parse entities: Character '.' is reserved"):
            await bot.send_message(jo["id"], "Done.", parse_mode="MarkdownV2")
        with pytest.raises(BadRequest, match="(?i)can't parse entities: Can't find end of Bold"):
            await bot.send_message(jo["id"], "*bold", parse_mode="MarkdownV2")
        with pytest.raises(BadRequest, match="(?i)can't find end tag corresponding .*\"b\""):
            await bot.send_message(jo["id"], "<b>bold", parse_mode="HTML")
        with pytest.raises(BadRequest, match='(?i)unsupported start tag "blink"'):
            await bot.send_message(jo["id"], "<blink>x</blink>", parse_mode="HTML")
        with pytest.raises(BadRequest, match="(?i)can't parse entities"):
            await bot.send_message(jo["id"], "a < b", parse_mode="HTML")
        with pytest.raises(BadRequest, match="(?i)can't parse entities"):
            await bot.send_message(jo["id"], "*unclosed", parse_mode="Markdown")

        html = await bot.send_message(
            jo["id"], '<b>1 &lt; 2</b> <a href="https://x.org">link</a>', parse_mode="HTML"
        )
        assert html.text == "1 < 2 link"
        assert [(e.type, e.offset, e.length) for e in html.entities] == [
            (MessageEntityType.BOLD, 0, 5),
            (MessageEntityType.TEXT_LINK, 6, 4),
        ]
        v2 = await bot.send_message(
            jo["id"], r"_hi_ \- `x.y` [a](https://e.com/\(1\))", parse_mode="MarkdownV2"
        )
        assert v2.text == "hi - x.y a"
        assert v2.entities[-1].url == "https://e.com/(1)"
    # only the successful sends are recorded
    assert len(fake.sent) == 3


async def test_rate_limit_injection_raises_retry_after(
    fake: FakeTelegramAPI, app: Application
) -> None:
    kim = fake.make_user("Kim")
    fake.private_chat(kim)
    fake.fail_next("sendMessage", retry_after=7)
    async with app:
        with pytest.raises(RetryAfter) as caught:
            await app.bot.send_message(kim["id"], "first")
        assert caught.value.retry_after == dtm.timedelta(seconds=7)
        await app.bot.send_message(kim["id"], "second")  # the failure was used up

        fake.fail_next("sendMessage", error_code=500, times=2)
        for _ in range(2):
            with pytest.raises(Exception, match="Internal Server Error"):
                await app.bot.send_message(kim["id"], "boom")
        fake.fail_next("editMessageText", error_code=400, description="Bad Request: custom")
        with pytest.raises(BadRequest, match="(?i)custom"):
            await app.bot.edit_message_text("x", chat_id=kim["id"], message_id=1)
    assert fake.messages_in(kim["id"]) == ["second"]
    failed = [call for call in fake.calls_to("sendMessage") if not call.ok]
    assert [call.status for call in failed] == [429, 500, 500]


async def test_delay_next_makes_the_client_time_out(fake: FakeTelegramAPI) -> None:
    app = (
        Application.builder()
        .token(fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .read_timeout(0.2)
        .build()
    )
    mo = fake.make_user("Mo")
    fake.private_chat(mo)
    async with app:
        fake.delay_next("sendMessage", 1.0)
        with pytest.raises(TimedOut):
            await app.bot.send_message(mo["id"], "slow")
        await app.bot.send_message(mo["id"], "fast")
    with pytest.raises(TimeoutError, match="condition not met"):
        await fake.wait_for(lambda: "slow" in fake.messages_in(mo["id"]), timeout=0.05)


async def test_error_bodies_match_telegram(fake: FakeTelegramAPI) -> None:
    fake.fail_next("sendMessage", retry_after=3)
    async with httpx.AsyncClient(base_url=fake.url) as client:
        limited = await client.post(
            f"/bot{fake.token}/sendMessage", json={"chat_id": 1, "text": "x"}
        )
        wrong_token = await client.post("/bot123:wrong/getMe")
        unknown = await client.post(f"/bot{fake.token}/fooBar")
        any_case = await client.get(f"/bot{fake.token}/GETME")
    assert limited.status_code == 429
    assert limited.json() == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 3",
        "parameters": {"retry_after": 3},
    }
    assert wrong_token.status_code == 401
    assert wrong_token.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
    assert unknown.status_code == 404
    assert unknown.json() == {"ok": False, "error_code": 404, "description": "Not Found"}
    assert any_case.json()["result"]["username"] == "parley_bot"


async def test_wrong_token_and_unknown_method_with_real_bot(fake: FakeTelegramAPI) -> None:
    bad = build_application(fake, token="42:not-the-token")
    with pytest.raises(InvalidToken):
        await bad.initialize()
    # Application.shutdown() is a no-op after a failed initialize(); the bot's HTTP client
    # must be closed directly or its socket leaks (a ResourceWarning in a later test).
    await bad.bot.shutdown()

    app = build_application(fake)
    async with app:
        with pytest.raises(EndPointNotFound):
            await app.bot.do_api_request("fooBar")


async def test_webhook_blocks_polling(fake: FakeTelegramAPI, app: Application) -> None:
    async with app:
        await app.bot.set_webhook("https://example.invalid/hook")
        with pytest.raises(Conflict, match="webhook is active"):
            await app.bot.get_updates(timeout=0)
        await app.bot.delete_webhook()
        assert await app.bot.get_updates(timeout=0) == ()


# ------------------------------------------------------------------ chat state


async def test_chat_actions_commands_and_members(fake: FakeTelegramAPI, app: Application) -> None:
    group = fake.make_supergroup("Admins", username="parley_admins")
    owner = fake.make_user("Owner")
    fake.set_member_status(group["id"], owner["id"], "creator")
    fake.set_member_status(group["id"], fake.bot_id, "administrator")
    async with app:
        bot = app.bot
        assert await bot.send_chat_action(group["id"], "typing")
        with pytest.raises(BadRequest, match="(?i)wrong parameter action"):
            await bot.send_chat_action(group["id"], "dancing")

        await bot.set_my_commands([("ask", "Ask the model"), ("reset", "Forget the chat")])
        await bot.set_my_commands(
            [("ban", "Ban a user")],
            scope={"type": "chat_administrators", "chat_id": group["id"]},
        )
        assert [c.command for c in await bot.get_my_commands()] == ["ask", "reset"]
        await bot.delete_my_commands()
        assert await bot.get_my_commands() == ()

        owner_member = await bot.get_chat_member(group["id"], owner["id"])
        bot_member = await bot.get_chat_member(group["id"], fake.bot_id)
        admins = await bot.get_chat_administrators(group["id"])
        chat = await bot.get_chat("@parley_admins")
        with pytest.raises(BadRequest, match="(?i)user not found"):
            await bot.get_chat_member(group["id"], 987654)

    assert [(a.chat_id, a.action) for a in fake.actions] == [(group["id"], "typing")]
    assert fake.commands == {
        f"chat_administrators:{group['id']}": [{"command": "ban", "description": "Ban a user"}]
    }
    assert isinstance(owner_member, ChatMemberOwner)
    assert isinstance(bot_member, ChatMemberAdministrator)
    assert bot_member.status == ChatMemberStatus.ADMINISTRATOR
    assert {m.user.id for m in admins} == {owner["id"], fake.bot_id}
    assert isinstance(chat, ChatFullInfo) and chat.id == group["id"]


async def test_inline_keyboards_presses_and_answers(fake: FakeTelegramAPI, app: Application) -> None:
    from telegram import InlineKeyboardButton, InlineKeyboardMarkup
    from telegram.ext import CallbackQueryHandler

    pressed: list[tuple[str, int, str | None]] = []

    async def on_press(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        pressed.append((query.from_user.first_name, query.message.message_id, query.data))
        await query.answer(f"got {query.data}")

    app.add_handler(CallbackQueryHandler(on_press))
    ann = fake.make_user("Ann")
    chat = fake.private_chat(ann)
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Stop", callback_data="p:stop:1")]])
    async with polling(app):
        sent = await app.bot.send_message(chat["id"], "streaming", reply_markup=keyboard)
        assert fake.keyboard_of(chat["id"], sent.message_id) == ["p:stop:1"]
        # editMessageText without a keyboard removes it, as in Telegram; with one it is kept.
        await app.bot.edit_message_text("more", chat_id=chat["id"], message_id=sent.message_id, reply_markup=keyboard)
        assert fake.keyboard_of(chat["id"], sent.message_id) == ["p:stop:1"]
        await app.bot.edit_message_text("done", chat_id=chat["id"], message_id=sent.message_id)
        assert fake.keyboard_of(chat["id"], sent.message_id) == []
        regen = InlineKeyboardMarkup([[InlineKeyboardButton("Again", callback_data="p:regen:1")]])
        await app.bot.edit_message_reply_markup(chat["id"], sent.message_id, reply_markup=regen)
        assert fake.keyboard_of(chat["id"], sent.message_id) == ["p:regen:1"]
        with pytest.raises(BadRequest, match="not modified"):
            await app.bot.edit_message_reply_markup(chat["id"], sent.message_id, reply_markup=regen)
        with pytest.raises(BadRequest, match="(?i)message to edit not found"):
            await app.bot.edit_message_reply_markup(chat["id"], 9999, reply_markup=regen)
        too_long = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="x" * 65)]])
        with pytest.raises(BadRequest, match="(?i)button_data_invalid"):
            await app.bot.send_message(chat["id"], "bad", reply_markup=too_long)
        update = fake.add_callback_query(ann, (chat["id"], sent.message_id), "p:regen:1")
        await fake.wait_for(lambda: fake.answers)
        assert pressed == [("Ann", sent.message_id, "p:regen:1")]
        [answer] = fake.answers
        assert (answer.query_id, answer.text, answer.show_alert) == (update["callback_query"]["id"], "got p:regen:1", False)
        # A query is answered once; an empty keyboard removes the keyboard.
        with pytest.raises(BadRequest, match="(?i)query is too old"):
            await app.bot.answer_callback_query(update["callback_query"]["id"])
        await app.bot.edit_message_reply_markup(chat["id"], sent.message_id, reply_markup=InlineKeyboardMarkup([]))
        assert fake.keyboard_of(chat["id"], sent.message_id) == []
        assert fake.markup_edits[-1] == (chat["id"], sent.message_id, None)

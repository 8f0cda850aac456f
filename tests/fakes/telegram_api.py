"""A fake Telegram Bot API server on 127.0.0.1 for end-to-end tests.

The real python-telegram-bot ``Application`` talks to it over real HTTP; only the far end is
fake (CONVENTIONS.md item 10). Point PTB at it with::

    async with FakeTelegramAPI() as fake:
        app = (
            Application.builder()
            .token(fake.token)
            .base_url(fake.base_url)            # f"{fake.url}/bot"
            .base_file_url(fake.base_file_url)  # f"{fake.url}/file/bot"
            .build()
        )
        await app.initialize()
        await app.start()
        await app.updater.start_polling(poll_interval=0, timeout=1)
        user = fake.make_user("Alice")
        fake.add_private_message(user, "hello")
        await fake.wait_for_message(user["id"], containing="hello")
        await app.updater.stop()
        await app.stop()
        await app.shutdown()

Everything is plain JSON-like ``dict`` data shaped as the Bot API documents it (Update, Message,
Chat, User, ChatMember, MessageEntity). The scripting methods (``add_*``, ``make_*``,
``fail_next`` ...) are synchronous and must be called from the event loop thread that runs the
fake; the waiting helpers (``wait_for`` ...) are coroutines with bounded timeouts.

Deliberate simplifications are listed in the docstring of :class:`FakeTelegramAPI`.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = [
    "ApiCall",
    "CallbackAnswer",
    "ChatAction",
    "EditedMessage",
    "FakeTelegramAPI",
    "SentDocument",
    "SentMessage",
]

JSONDict = dict[str, Any]

DEFAULT_TOKEN = "123456789:AAFakeTokenForParleyTestsOnly_0123456"

MAX_MESSAGE_LENGTH = 4096
MAX_POLL_TIMEOUT = 50.0
DEFAULT_EXCLUDED_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
MEMBER_STATUSES = frozenset({"creator", "administrator", "member", "restricted", "left", "kicked"})

# Form-encoded parameters arrive as strings; these stay strings, the rest are JSON-decoded
# (PTB JSON-encodes every non-string value before form-encoding it).
_STRING_PARAMETERS = frozenset(
    {
        "text",
        "parse_mode",
        "action",
        "language_code",
        "description",
        "short_description",
        "caption",
        "emoji",
        "url",
        "secret_token",
        "name",
        "title",
        "inline_message_id",
        "callback_query_id",
        "file_id",
        "business_connection_id",
        "message_effect_id",
        "quote",
        "ip_address",
    }
)

_DEFAULT_ERROR_DESCRIPTIONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: "Conflict: terminated by other getUpdates request; make sure that only one bot instance "
    "is running",
    500: "Internal Server Error",
    502: "Bad Gateway",
}

_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)

# A valid 1x1 transparent PNG, the default content of injected photos.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class ApiCall:
    """One HTTP request to the Bot API, recorded in arrival order.

    ``method`` is the canonical Bot API name (``"sendMessage"``) or, for unknown methods, the name
    as sent. ``params`` are the decoded parameters. ``status`` and ``response`` are filled in
    when the answer is sent (``None`` while a long poll is still waiting). ``time`` is
    :func:`time.monotonic` at arrival.
    """

    method: str
    params: JSONDict
    time: float
    status: int | None = None
    response: JSONDict | None = None

    @property
    def ok(self) -> bool:
        """Whether the answer was ``{"ok": true, ...}``."""
        return self.status == 200


@dataclass(frozen=True)
class SentDocument:
    """A successful ``sendDocument``: the decoded ``params``, the uploaded file and the message."""

    params: JSONDict
    filename: str
    data: bytes
    message: JSONDict


@dataclass(frozen=True)
class SentMessage:
    """A successful ``sendMessage``: the decoded request ``params`` and the resulting ``message``.

    ``message`` is the Message as returned (its ``text`` is the text *after* entity parsing, the
    way Telegram stores it); it is not updated by later edits — see
    :meth:`FakeTelegramAPI.messages_in` for the current text.
    """

    params: JSONDict
    message: JSONDict

    @property
    def chat_id(self) -> int:
        """The chat the message went to."""
        return self.message["chat"]["id"]

    @property
    def message_id(self) -> int:
        """The new message's id."""
        return self.message["message_id"]

    @property
    def text(self) -> str:
        """The stored (parsed) text at send time."""
        return self.message.get("text", "")

    @property
    def raw_text(self) -> str:
        """The ``text`` parameter as sent, markup included."""
        return self.params.get("text", "")


@dataclass(frozen=True)
class EditedMessage:
    """A successful ``editMessageText``: request ``params``, text before, resulting ``message``."""

    params: JSONDict
    previous_text: str
    message: JSONDict

    @property
    def chat_id(self) -> int:
        """The chat of the edited message."""
        return self.message["chat"]["id"]

    @property
    def message_id(self) -> int:
        """The edited message's id."""
        return self.message["message_id"]

    @property
    def text(self) -> str:
        """The stored (parsed) text after this edit."""
        return self.message.get("text", "")


@dataclass(frozen=True)
class CallbackAnswer:
    """A successful ``answerCallbackQuery``: the query answered and what the presser is shown."""

    query_id: str
    text: str | None
    show_alert: bool
    params: JSONDict


@dataclass(frozen=True)
class ChatAction:
    """A successful ``sendChatAction``."""

    chat_id: int
    action: str
    message_thread_id: int | None
    time: float


@dataclass
class _ChatState:
    chat: JSONDict
    messages: dict[int, JSONDict] = field(default_factory=dict)
    members: dict[int, JSONDict] = field(default_factory=dict)
    topics: dict[int, str] = field(default_factory=dict)
    next_message_id: int = 1

    def new_message_id(self) -> int:
        message_id = self.next_message_id
        self.next_message_id += 1
        return message_id


@dataclass
class _QueuedUpdate:
    update: JSONDict
    delivered: bool = False
    # A re-delivery (an update_id at or below one already issued) is kept until it has been
    # handed out once, even though the offset the client sends already "confirms" its id.
    redelivery: bool = False

    @property
    def update_id(self) -> int:
        return self.update["update_id"]

    @property
    def kind(self) -> str:
        return next((key for key in self.update if key != "update_id"), "")


@dataclass
class _Failure:
    remaining: int
    error_code: int
    description: str
    parameters: JSONDict | None


class _ApiError(Exception):
    def __init__(self, error_code: int, description: str, parameters: JSONDict | None = None):
        super().__init__(description)
        self.error_code = error_code
        self.description = description
        self.parameters = parameters

    def body(self) -> JSONDict:
        body: JSONDict = {
            "ok": False,
            "error_code": self.error_code,
            "description": self.description,
        }
        if self.parameters:
            body["parameters"] = self.parameters
        return body


class _ParseError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Text helpers: UTF-16 offsets, entity detection, parse modes
# --------------------------------------------------------------------------------------------


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _byte_offset(text: str, index: int) -> int:
    return len(text[:index].encode("utf-8"))


_COMMAND_RE = re.compile(r"(?<![\w/@])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![\w/])")
_MENTION_RE = re.compile(r"(?<![\w@])@[A-Za-z][A-Za-z0-9_]{3,31}(?![\w@])")


def _detect_entities(text: str) -> list[JSONDict]:
    """Mention and bot_command entities, as Telegram adds them to incoming text."""
    entities: list[JSONDict] = []
    for kind, pattern in (("bot_command", _COMMAND_RE), ("mention", _MENTION_RE)):
        for match in pattern.finditer(text):
            start = _utf16_len(text[: match.start()])
            if kind == "mention" and any(
                e["offset"] <= start < e["offset"] + e["length"] for e in entities
            ):
                continue  # the @bot of /cmd@bot is part of the command entity
            entities.append(
                {"type": kind, "offset": start, "length": _utf16_len(match.group())}
            )
    return sorted(entities, key=lambda e: (e["offset"], -e["length"]))


class _TextBuilder:
    """Collects parsed text and entities with UTF-16 offsets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.position = 0  # in UTF-16 code units
        self.entities: list[JSONDict] = []

    def append(self, text: str) -> None:
        self.parts.append(text)
        self.position += _utf16_len(text)

    def add_entity(self, kind: str, start: int, **extra: Any) -> None:
        length = self.position - start
        if length <= 0:
            return  # Telegram silently drops empty entities
        entity: JSONDict = {"type": kind, "offset": start, "length": length}
        entity.update({k: v for k, v in extra.items() if v is not None})
        self.entities.append(entity)

    def result(self) -> tuple[str, list[JSONDict]]:
        entities = sorted(self.entities, key=lambda e: (e["offset"], -e["length"]))
        return "".join(self.parts), entities


_HTML_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "span": "spoiler",
    "tg-spoiler": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
_HTML_START_TAG_RE = re.compile(
    r"<([A-Za-z][A-Za-z0-9-]*)"
    r"((?:\s+[A-Za-z][A-Za-z0-9-]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s>\"']+))?)*)\s*>"
)
_HTML_ATTR_RE = re.compile(
    r"([A-Za-z][A-Za-z0-9-]*)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>\"']+)))?"
)
# Numeric entities and the four named ones the Bot API documents; others stay literal.
_HTML_ENTITY_RE = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|lt|gt|amp|quot);")


def _parse_html(text: str) -> tuple[str, list[JSONDict]]:
    out = _TextBuilder()
    stack: list[tuple[str, int, JSONDict]] = []  # (tag, start, entity extras)
    i = 0
    while i < len(text):
        char = text[i]
        if char == "<" and text.startswith("</", i):
            end = text.find(">", i)
            if end == -1:
                raise _ParseError(f"Unclosed end tag at byte offset {_byte_offset(text, i)}")
            name = text[i + 2 : end].strip().lower()
            if not stack:
                raise _ParseError(f"Unexpected end tag at byte offset {_byte_offset(text, i)}")
            tag, start, extra = stack.pop()
            if name != tag:
                raise _ParseError(
                    f'Unmatched end tag at byte offset {_byte_offset(text, i)}, expected '
                    f'"</{tag}>", found "</{name}>"'
                )
            if tag == "code" and stack and stack[-1][0] == "pre":
                # <pre><code class="language-x"> sets the language of the pre entity
                stack[-1][2].setdefault("language", extra.get("language"))
            elif extra.get("type"):
                entity_extra = {k: v for k, v in extra.items() if k != "type"}
                out.add_entity(extra["type"], start, **entity_extra)
            i = end + 1
        elif char == "<":
            match = _HTML_START_TAG_RE.match(text, i)
            name = match.group(1).lower() if match else ""
            if not match or name not in _HTML_TAGS:
                if not match:
                    word = re.match(r"<([^\s>]*)", text[i:])
                    name = word.group(1) if word else ""
                raise _ParseError(
                    f'Unsupported start tag "{name}" at byte offset {_byte_offset(text, i)}'
                )
            attrs = {
                m.group(1).lower(): html.unescape(m.group(2) or m.group(3) or m.group(4) or "")
                for m in _HTML_ATTR_RE.finditer(match.group(2))
            }
            extra: JSONDict = {"type": _HTML_TAGS[name]}
            if name == "span" and attrs.get("class") != "tg-spoiler":
                raise _ParseError('Tag "span" must have class "tg-spoiler"')
            if name == "a":
                href = attrs.get("href", "")
                user = re.fullmatch(r"tg://user\?id=(\d+)", href)
                if user:
                    extra = {"type": "text_mention", "user": {"id": int(user.group(1))}}
                elif href:
                    extra["url"] = href
                else:
                    extra = {}
            if name == "code" and attrs.get("class", "").startswith("language-"):
                extra["language"] = attrs["class"][len("language-") :]
            if name == "blockquote" and "expandable" in attrs:
                extra["type"] = "expandable_blockquote"
            if name == "tg-emoji":
                if "emoji-id" not in attrs:
                    raise _ParseError('Tag "tg-emoji" must have attribute "emoji-id"')
                extra["custom_emoji_id"] = attrs["emoji-id"]
            stack.append((name, out.position, extra))
            i = match.end()
        elif char == "&":
            entity = _HTML_ENTITY_RE.match(text, i)
            decoded = html.unescape(entity.group()) if entity else "&"
            if entity and decoded != entity.group():
                out.append(decoded)
                i = entity.end()
            else:
                out.append("&")  # Telegram leaves unknown entities as they are
                i += 1
        else:
            out.append(char)
            i += 1
    if stack:
        raise _ParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return out.result()


_MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")
_V2_NAMES = {
    "bold": "Bold",
    "italic": "Italic",
    "underline": "Underline",
    "strikethrough": "Strikethrough",
    "spoiler": "Spoiler",
    "text_link": "TextUrl",
    "custom_emoji": "CustomEmoji",
}


def _reserved(text: str, i: int) -> _ParseError:
    return _ParseError(
        f"Character '{text[i]}' is reserved and must be escaped with the preceding '\\'"
    )


def _scan_until(text: str, start: int, terminator: str) -> tuple[str, int] | None:
    """Unescape text from ``start`` until an unescaped ``terminator``; (content, index)."""
    parts: list[str] = []
    j = start
    while j < len(text):
        if text[j] == "\\" and j + 1 < len(text):
            parts.append(text[j + 1])
            j += 2
        elif text.startswith(terminator, j):
            return "".join(parts), j
        else:
            parts.append(text[j])
            j += 1
    return None


def _parse_markdown_v2(text: str) -> tuple[str, list[JSONDict]]:
    out = _TextBuilder()
    stack: list[tuple[str, int, int]] = []  # (entity type, start, byte offset of opener)
    quote: tuple[int, str] | None = None  # (start, type) of the open block quote
    i = 0
    n = len(text)

    def toggle(kind: str) -> None:
        if stack and stack[-1][0] == kind:
            _, start, _ = stack.pop()
            out.add_entity(kind, start)
        elif any(entry[0] == kind for entry in stack):
            top_kind, _, top_byte = stack[-1]
            raise _ParseError(
                f"Can't find end of {_V2_NAMES.get(top_kind, top_kind)} entity at byte offset "
                f"{top_byte}"
            )
        else:
            stack.append((kind, out.position, _byte_offset(text, i)))

    while i < n:
        char = text[i]
        line_start = i == 0 or text[i - 1] == "\n"
        if line_start and quote is not None and char != ">":
            quote_start, quote_type = quote
            if out.parts and out.parts[-1] == "\n":
                out.parts.pop()
                out.position -= 1
                out.add_entity(quote_type, quote_start)
                out.append("\n")
            else:
                out.add_entity(quote_type, quote_start)
            quote = None
        if char == "\\":
            if i + 1 >= n:
                raise _reserved(text, i)
            out.append(text[i + 1])
            i += 2
        elif line_start and char == ">":
            if quote is None:
                quote = (out.position, "blockquote")
            i += 1
        elif line_start and text.startswith("**>", i):
            quote = (out.position, "expandable_blockquote")
            i += 3
        elif quote is not None and quote[1] == "expandable_blockquote" and text.startswith(
            "||", i
        ) and (i + 2 == n or text[i + 2] == "\n"):
            i += 2  # the || that closes an expandable block quote
        elif char == "`":
            if text.startswith("```", i):
                scanned = _scan_until(text, i + 3, "```")
                if scanned is None:
                    raise _ParseError(
                        f"Can't find end of Pre entity at byte offset {_byte_offset(text, i)}"
                    )
                content, end = scanned
                language = None
                first_line, newline, rest = content.partition("\n")
                if newline and first_line and not re.search(r"\s", first_line):
                    language, content = first_line, rest
                elif newline and not first_line:
                    content = rest
                start = out.position
                out.append(content)
                out.add_entity("pre", start, language=language)
                i = end + 3
            else:
                scanned = _scan_until(text, i + 1, "`")
                if scanned is None:
                    raise _ParseError(
                        f"Can't find end of Code entity at byte offset {_byte_offset(text, i)}"
                    )
                content, end = scanned
                start = out.position
                out.append(content)
                out.add_entity("code", start)
                i = end + 1
        elif char == "*":
            toggle("bold")
            i += 1
        elif char == "_":
            if text.startswith("__", i):
                toggle("underline")
                i += 2
            else:
                toggle("italic")
                i += 1
        elif char == "~":
            toggle("strikethrough")
            i += 1
        elif char == "|":
            if not text.startswith("||", i):
                raise _reserved(text, i)
            toggle("spoiler")
            i += 2
        elif char == "[":
            stack.append(("text_link", out.position, _byte_offset(text, i)))
            i += 1
        elif char == "!" and text.startswith("![", i):
            stack.append(("custom_emoji", out.position, _byte_offset(text, i)))
            i += 2
        elif char == "]":
            if not stack or stack[-1][0] not in ("text_link", "custom_emoji"):
                raise _reserved(text, i)
            kind, start, opener = stack.pop()
            if not text.startswith("(", i + 1):
                raise _ParseError(f"Can't find end of a URL at byte offset {opener}")
            scanned = _scan_until(text, i + 2, ")")
            if scanned is None:
                raise _ParseError(f"Can't find end of a URL at byte offset {opener}")
            url, end = scanned
            if kind == "custom_emoji":
                emoji_id = re.fullmatch(r"tg://emoji\?id=(\d+)", url)
                if not emoji_id:
                    raise _ParseError("Custom emoji URL must have an emoji identifier")
                out.add_entity("custom_emoji", start, custom_emoji_id=emoji_id.group(1))
            else:
                user = re.fullmatch(r"tg://user\?id=(\d+)", url)
                if user:
                    out.add_entity("text_mention", start, user={"id": int(user.group(1))})
                else:
                    out.add_entity("text_link", start, url=url)
            i = end + 1
        elif char in _MARKDOWN_V2_RESERVED:
            raise _reserved(text, i)
        else:
            out.append(char)
            i += 1
    if stack:
        kind, _, opener = stack[-1]
        raise _ParseError(
            f"Can't find end of {_V2_NAMES.get(kind, kind)} entity at byte offset {opener}"
        )
    if quote is not None:
        out.add_entity(quote[1], quote[0])
    return out.result()


def _parse_markdown_legacy(text: str) -> tuple[str, list[JSONDict]]:
    out = _TextBuilder()
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\" and i + 1 < n and text[i + 1] in "_*`[":
            out.append(text[i + 1])
            i += 2
            continue
        if char not in "_*`[":
            out.append(char)
            i += 1
            continue
        error = _ParseError(
            f"Can't find end of the entity starting at byte offset {_byte_offset(text, i)}"
        )
        start = out.position
        if text.startswith("```", i):
            end = text.find("```", i + 3)
            if end == -1:
                raise error
            content = text[i + 3 : end]
            language = None
            first_line, newline, rest = content.partition("\n")
            if newline and first_line and not re.search(r"\s", first_line):
                language, content = first_line, rest
            out.append(content)
            out.add_entity("pre", start, language=language)
            i = end + 3
        elif char == "[":
            close = text.find("]", i + 1)
            if close == -1 or not text.startswith("(", close + 1):
                raise error
            url_end = text.find(")", close + 2)
            if url_end == -1:
                raise error
            out.append(text[i + 1 : close])
            out.add_entity("text_link", start, url=text[close + 2 : url_end])
            i = url_end + 1
        else:
            end = text.find(char, i + 1)
            if end == -1:
                raise error
            out.append(text[i + 1 : end])
            out.add_entity({"*": "bold", "_": "italic", "`": "code"}[char], start)
            i = end + 1
    return out.result()


_PARSERS: dict[str, Callable[[str], tuple[str, list[JSONDict]]]] = {
    "markdownv2": _parse_markdown_v2,
    "html": _parse_html,
    "markdown": _parse_markdown_legacy,
}


# --------------------------------------------------------------------------------------------
# The fake server
# --------------------------------------------------------------------------------------------


class FakeTelegramAPI:
    """A Bot API server on 127.0.0.1 backed by in-memory chats, with scripting and recording.

    Args:
        token: the bot token the server accepts; any other well-formed token gets 401
            ``Unauthorized``, a malformed one 404 ``Not Found``. The bot's id is the part
            before the colon.
        bot_username: the bot's username (without ``@``), returned by ``getMe`` and used to
            recognise mentions.
        bot_first_name: the bot's display name.
        can_join_groups, supports_inline_queries: reported by ``getMe``.
        privacy_mode: when true (Telegram's default for new bots) ``getMe`` reports
            ``can_read_all_group_messages: false`` and, unless the bot is an administrator of
            the chat, group messages are only queued for the bot when they are commands,
            mention the bot, or reply to one of the bot's messages; the others are kept in the
            chat and listed in :attr:`withheld`. Off by default so that tests see every message.

    Recording (read freely, in order of arrival): :attr:`calls`, :attr:`sent`, :attr:`edits`,
    :attr:`markup_edits`, :attr:`answers`, :attr:`deleted`, :attr:`actions`, :attr:`commands`,
    :attr:`withheld`.

    Inline keyboards: ``reply_markup`` with ``inline_keyboard`` on ``sendMessage``,
    ``editMessageText`` (an edit without one removes the keyboard, as in Telegram) and
    ``editMessageReplyMarkup`` (an empty keyboard removes it); a press is injected with
    :meth:`add_callback_query` and answered with ``answerCallbackQuery`` (once per query, as
    Telegram allows). :meth:`keyboard_of` reads a message's buttons.

    Simplifications (deliberate): message ids are counted per chat; the length limit counts
    Unicode code points of the text after entity parsing (entity offsets are UTF-16 code units,
    as in the Bot API); the parse-mode checks cover the common mistakes (unescaped reserved
    characters, unbalanced or unknown tags/markers), not every corner of Telegram's parser;
    ``message_thread_id`` is checked against known topics in forum supergroups and ignored in
    private chats and basic groups; there is no automatic flood control (inject it with
    :meth:`fail_next`); inline messages, media sending and webhooks deliveries are not served.
    """

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_username: str = "parley_bot",
        bot_first_name: str = "Parley",
        can_join_groups: bool = True,
        supports_inline_queries: bool = False,
        privacy_mode: bool = False,
    ) -> None:
        bot_id, _, _ = token.partition(":")
        if not bot_id.isdigit():
            raise ValueError("token must look like '<bot id>:<secret>'")
        self.token = token
        self.bot_id = int(bot_id)
        self.bot_username = bot_username
        self.bot_first_name = bot_first_name
        self.can_join_groups = can_join_groups
        self.supports_inline_queries = supports_inline_queries
        self.privacy_mode = privacy_mode

        self.calls: list[ApiCall] = []
        """Every request, in arrival order (including failed and unknown ones)."""
        self.sent: list[SentMessage] = []
        """Every successful ``sendMessage``."""
        self.documents: list[SentDocument] = []
        """Every successful ``sendDocument``, with the uploaded file's name and bytes."""
        self.edits: list[EditedMessage] = []
        """Every successful ``editMessageText``."""
        self.markup_edits: list[tuple[int, int, JSONDict | None]] = []
        """``(chat_id, message_id, reply_markup or None)`` of every successful ``editMessageReplyMarkup``."""
        self.answers: list[CallbackAnswer] = []
        """Every successful ``answerCallbackQuery``."""
        self.deleted: list[tuple[int, int]] = []
        """``(chat_id, message_id)`` of every successful ``deleteMessage``."""
        self.actions: list[ChatAction] = []
        """Every successful ``sendChatAction``."""
        self.commands: dict[str, list[JSONDict]] = {}
        """``setMyCommands`` state: scope key (see :meth:`scope_key`) → list of BotCommand."""
        self.withheld: list[JSONDict] = []
        """Updates not queued because of privacy mode."""
        self.webhook_url = ""
        self.poll_conflicts = 0
        """How many ``getUpdates`` long polls were ended with 409 Conflict because another one
        overlapped them (two bot instances polling one token, which Telegram refuses)."""

        self._chats: dict[int, _ChatState] = {}
        self._users: dict[int, JSONDict] = {}
        self._files: dict[str, tuple[JSONDict, bytes]] = {}  # file_id → (File, content)
        self._queue: list[_QueuedUpdate] = []
        self._queries: dict[str, bool] = {}  # callback query id → answered
        self._query_ids = itertools.count(9_000_000_001)
        self._last_update_id = 700_000_000
        self._allowed_updates: list[str] = []
        self._failures: dict[str, list[_Failure]] = {}
        self._delays: dict[str, list[float]] = {}
        self._user_ids = itertools.count(100_001)
        self._group_ids = itertools.count(4_000_000_001)
        self._supergroup_ids = itertools.count(1_000_000_000_001)
        self._file_ids = itertools.count(1)
        self._poll_generation = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._handlers: dict[str, tuple[str, Callable[[JSONDict], Any]]] = {
            name.lower(): (name, handler)
            for name, handler in {
                "getMe": self._get_me,
                "logOut": self._true,
                "close": self._true,
                "getUpdates": self._get_updates,
                "setWebhook": self._set_webhook,
                "deleteWebhook": self._delete_webhook,
                "getWebhookInfo": self._get_webhook_info,
                "sendMessage": self._send_message,
                "sendDocument": self._send_document,
                "editMessageText": self._edit_message_text,
                "editMessageReplyMarkup": self._edit_message_reply_markup,
                "answerCallbackQuery": self._answer_callback_query,
                "deleteMessage": self._delete_message,
                "sendChatAction": self._send_chat_action,
                "setMyCommands": self._set_my_commands,
                "getMyCommands": self._get_my_commands,
                "deleteMyCommands": self._delete_my_commands,
                "getChat": self._get_chat,
                "getChatMember": self._get_chat_member,
                "getChatAdministrators": self._get_chat_administrators,
                "getFile": self._get_file,
            }.items()
        }

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind 127.0.0.1 on a free port and start serving."""
        if self._runner is not None:
            raise RuntimeError("FakeTelegramAPI is already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle_api)
        app.router.add_route("GET", "/file/bot{token}/{path:.+}", self._handle_file)
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._closing = False
        self._port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Answer waiting long polls with no updates, close connections and stop serving."""
        if self._runner is None:
            return
        self._closing = True
        self._notify()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> FakeTelegramAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (only valid while started)."""
        if self._port is None:
            raise RuntimeError("FakeTelegramAPI is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        """The value for ``ApplicationBuilder.base_url``: ``f"{url}/bot"``."""
        return f"{self.url}/bot"

    @property
    def base_file_url(self) -> str:
        """The value for ``ApplicationBuilder.base_file_url``: ``f"{url}/file/bot"``."""
        return f"{self.url}/file/bot"

    @property
    def bot_user(self) -> JSONDict:
        """The bot as a User object (as it appears in ``from`` of its messages)."""
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.bot_first_name,
            "username": self.bot_username,
        }

    # ---------------------------------------------------------------- users and chats

    def make_user(
        self,
        first_name: str = "Alice",
        *,
        username: str | None = None,
        last_name: str | None = None,
        language_code: str | None = "en",
        user_id: int | None = None,
        is_bot: bool = False,
    ) -> JSONDict:
        """Create (and remember) a User; ids are allocated automatically unless given."""
        user: JSONDict = {
            "id": user_id if user_id is not None else next(self._user_ids),
            "is_bot": is_bot,
            "first_name": first_name,
        }
        if last_name is not None:
            user["last_name"] = last_name
        if username is not None:
            user["username"] = username
        if language_code is not None:
            user["language_code"] = language_code
        self._users[user["id"]] = user
        return user

    def anonymous_admin(self) -> JSONDict:
        """Telegram's ``GroupAnonymousBot``: the ``from`` of messages that anonymous group
        administrators send (with ``sender_chat`` set to the group itself)."""
        return self.make_user("Group", username="GroupAnonymousBot", user_id=1087968824, is_bot=True, language_code=None)

    def private_chat(self, user: JSONDict) -> JSONDict:
        """The private chat between ``user`` and the bot (chat id == user id); registers it."""
        self._users.setdefault(user["id"], user)
        state = self._chats.get(user["id"])
        if state is None:
            chat: JSONDict = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
            for key in ("last_name", "username"):
                if key in user:
                    chat[key] = user[key]
            state = self._register_chat(chat)
            state.members[user["id"]] = self._member(user, "member")
            state.members[self.bot_id] = self._member(self.bot_user, "member")
        return state.chat

    def make_group(
        self, title: str = "Parley test group", *, chat_id: int | None = None
    ) -> JSONDict:
        """Create a basic group (negative id); the bot is a plain member."""
        chat = {
            "id": chat_id if chat_id is not None else -next(self._group_ids),
            "type": "group",
            "title": title,
        }
        return self._register_chat(chat).chat

    def make_supergroup(
        self,
        title: str = "Parley test supergroup",
        *,
        username: str | None = None,
        chat_id: int | None = None,
        is_forum: bool = False,
    ) -> JSONDict:
        """Create a supergroup (id ``-100…``); ``is_forum=True`` enables topics."""
        chat: JSONDict = {
            "id": chat_id if chat_id is not None else -next(self._supergroup_ids),
            "type": "supergroup",
            "title": title,
        }
        if username is not None:
            chat["username"] = username
        if is_forum:
            chat["is_forum"] = True
        return self._register_chat(chat).chat

    def make_forum(self, title: str = "Parley test forum", **kwargs: Any) -> JSONDict:
        """Create a forum supergroup (topics enabled); see :meth:`create_topic`."""
        return self.make_supergroup(title, is_forum=True, **kwargs)

    def create_topic(
        self,
        chat: JSONDict | int,
        name: str,
        *,
        creator: JSONDict | None = None,
        icon_color: int = 7322096,
        deliver: bool = False,
    ) -> int:
        """Create a forum topic and return its ``message_thread_id``.

        As in Telegram, the topic is the service message carrying ``forum_topic_created``;
        its message id is the thread id, and messages in the topic that reply to nothing
        carry it as their ``reply_to_message``. With ``deliver=True`` the service message is
        also queued as an update.
        """
        state = self._state_for(chat)
        if not state.chat.get("is_forum"):
            raise ValueError("topics exist only in forum supergroups (make_forum)")
        creator = creator or self.make_user("Topic creator")
        thread_id = state.new_message_id()
        message = {
            "message_id": thread_id,
            "from": creator,
            "chat": dict(state.chat),
            "date": int(time.time()),
            "message_thread_id": thread_id,
            "is_topic_message": True,
            "forum_topic_created": {"name": name, "icon_color": icon_color},
        }
        state.messages[thread_id] = message
        state.topics[thread_id] = name
        if deliver:
            self._enqueue({"message": message})
        return thread_id

    def set_member_status(
        self, chat_id: int, user_id: int, status: str, **fields: Any
    ) -> JSONDict:
        """Set the ChatMember status of a user (or of the bot, ``fake.bot_id``) in a chat.

        ``status`` is one of ``creator``, ``administrator``, ``member``, ``restricted``,
        ``left``, ``kicked``; ``fields`` override the ChatMember fields (e.g.
        ``custom_title="Boss"`` or ``can_delete_messages=False``). Returns the ChatMember.
        """
        if status not in MEMBER_STATUSES:
            expected = sorted(MEMBER_STATUSES)
            raise ValueError(f"unknown status {status!r}; expected one of {expected}")
        state = self._state_for(chat_id)
        user = self.bot_user if user_id == self.bot_id else self._users.get(user_id)
        if user is None:
            raise KeyError(f"unknown user {user_id}; create it with make_user() first")
        member = self._member(user, status, **fields)
        state.members[user_id] = member
        return member

    def chat(self, chat_id: int) -> JSONDict:
        """The Chat object of a registered chat."""
        return self._state_for(chat_id).chat

    # ---------------------------------------------------------------- incoming messages

    def add_private_message(
        self,
        user: JSONDict,
        text: str,
        *,
        reply_to_message_id: int | None = None,
        entities: list[JSONDict] | None = None,
    ) -> JSONDict:
        """Queue a text message from ``user`` to the bot in their private chat; returns the Update.

        Without ``entities``, ``mention`` and ``bot_command`` entities are detected as
        Telegram does.
        """
        chat = self.private_chat(user)
        return self._add_user_message(
            chat,
            user,
            {"text": text},
            reply_to_message_id=reply_to_message_id,
            entities=entities,
        )

    def add_group_message(
        self,
        chat: JSONDict | int,
        user: JSONDict,
        text: str,
        *,
        reply_to_message_id: int | None = None,
        message_thread_id: int | None = None,
        entities: list[JSONDict] | None = None,
        is_topic_message: bool | None = None,
        sender_chat: JSONDict | None = None,
    ) -> JSONDict:
        """Queue a text message from ``user`` in a group/supergroup/forum; returns the Update.

        ``sender_chat`` is the chat the message is sent on behalf of: the group itself for an
        anonymous administrator (``user`` is then :meth:`anonymous_admin`), a channel for a post
        sent as that channel.

        Without ``entities``, a ``mention`` entity is created for every ``@username`` (so
        ``@<bot_username>`` mentions the bot) and a ``bot_command`` entity for ``/cmd`` or
        ``/cmd@bot``. In a forum, ``message_thread_id`` names the topic (see
        :meth:`create_topic`); ``is_topic_message`` defaults to true there, and a message that
        replies to nothing gets the topic's creation message as ``reply_to_message``, as in
        Telegram. In a plain supergroup a reply carries the ``message_thread_id`` of the thread
        it belongs to.
        """
        content: JSONDict = {"text": text}
        if sender_chat is not None:
            content["sender_chat"] = dict(sender_chat)
        return self._add_user_message(
            chat,
            user,
            content,
            reply_to_message_id=reply_to_message_id,
            message_thread_id=message_thread_id,
            entities=entities,
            is_topic_message=is_topic_message,
        )

    def add_edited_message(
        self, message: JSONDict, text: str, *, entities: list[JSONDict] | None = None
    ) -> JSONDict:
        """Edit a user message added earlier and queue an ``edited_message`` Update.

        ``message`` is the Message dict (e.g. ``update["message"]``); returns the Update.
        """
        state = self._state_for(message["chat"]["id"])
        stored = state.messages.get(message["message_id"])
        if stored is None:
            raise KeyError(f"message {message['message_id']} not found in chat {state.chat['id']}")
        stored["text"] = text
        stored["edit_date"] = int(time.time())
        detected = entities if entities is not None else _detect_entities(text)
        if detected:
            stored["entities"] = detected
        else:
            stored.pop("entities", None)
        return self._enqueue({"edited_message": _copy(stored)})

    def add_photo_message(
        self,
        chat: JSONDict | int,
        user: JSONDict,
        *,
        caption: str | None = None,
        data: bytes = TINY_PNG,
        width: int = 1,
        height: int = 1,
        reply_to_message_id: int | None = None,
        message_thread_id: int | None = None,
    ) -> JSONDict:
        """Queue a photo message (no text); the photo can be fetched via ``getFile``.

        For a private chat pass ``fake.private_chat(user)``. Returns the Update.
        """
        photo = self._register_file(data, width=width, height=height)
        content: JSONDict = {"photo": [photo]}
        if caption is not None:
            content["caption"] = caption
            caption_entities = _detect_entities(caption)
            if caption_entities:
                content["caption_entities"] = caption_entities
        return self._add_user_message(
            chat,
            user,
            content,
            reply_to_message_id=reply_to_message_id,
            message_thread_id=message_thread_id,
        )

    def add_sticker_message(
        self,
        chat: JSONDict | int,
        user: JSONDict,
        *,
        emoji: str = "👍",
        reply_to_message_id: int | None = None,
        message_thread_id: int | None = None,
    ) -> JSONDict:
        """Queue a sticker message (no text); returns the Update.

        For a private chat pass ``fake.private_chat(user)``.
        """
        sticker = self._register_file(b"RIFF\x00\x00\x00\x00WEBP", width=512, height=512)
        sticker.update(
            {
                "type": "regular",
                "is_animated": False,
                "is_video": False,
                "emoji": emoji,
                "set_name": "ParleyTestStickers",
            }
        )
        return self._add_user_message(
            chat,
            user,
            {"sticker": sticker},
            reply_to_message_id=reply_to_message_id,
            message_thread_id=message_thread_id,
        )

    def add_callback_query(
        self, user: JSONDict, message: JSONDict | tuple[int, int], data: str, *, query_id: str | None = None
    ) -> JSONDict:
        """Queue a press of an inline keyboard button by ``user`` on a message; returns the Update.

        ``message`` is a Message dict or ``(chat_id, message_id)``; the update carries the message
        in its current state. ``data`` is the button's ``callback_data`` as the bot set it (any
        string: the fake does not check that the message shows such a button). Each call is a new
        press with a new query id; deliver the same press again with :meth:`redeliver`.
        """
        chat_id, message_id = (message["chat"]["id"], message["message_id"]) if isinstance(message, dict) else message
        state = self._state_for(chat_id)
        stored = state.messages.get(message_id)
        if stored is None:
            raise KeyError(f"no message {message_id} in chat {chat_id}")
        self._users.setdefault(user["id"], user)
        query = query_id or str(next(self._query_ids))
        self._queries.setdefault(query, False)
        return self._enqueue(
            {
                "callback_query": {
                    "id": query,
                    "from": user,
                    "message": _copy(stored),
                    "chat_instance": str(-abs(chat_id)),
                    "data": data,
                }
            }
        )

    def keyboard_of(self, chat_id: int, message_id: int) -> list[str]:
        """The ``callback_data`` of every inline button a message shows now (row by row)."""
        markup = self.message(chat_id, message_id).get("reply_markup") or {}
        return [button.get("callback_data", "") for row in markup.get("inline_keyboard", []) for button in row]

    def add_update(self, raw: JSONDict) -> JSONDict:
        """Queue an arbitrary Update dict and return it.

        Without ``update_id`` the next id is assigned. An ``update_id`` at or below one already
        issued is a re-delivery: it is handed out once more even if the client has already
        confirmed that id (the fake never de-duplicates). Chats and messages found in
        ``message``/``edited_message`` are registered so the bot can answer them.
        """
        update = _copy(raw)
        for key in ("message", "edited_message"):
            message = update.get(key)
            if isinstance(message, dict) and "chat" in message and "message_id" in message:
                state = self._chats.get(message["chat"]["id"]) or self._register_chat(
                    dict(message["chat"])
                )
                state.messages.setdefault(message["message_id"], _copy(message))
                state.next_message_id = max(state.next_message_id, message["message_id"] + 1)
                if "from" in message:
                    self._users.setdefault(message["from"]["id"], message["from"])
        if "update_id" not in update:
            return self._enqueue(update)
        redelivery = update["update_id"] <= self._last_update_id
        self._last_update_id = max(self._last_update_id, update["update_id"])
        self._queue.append(_QueuedUpdate(update, redelivery=redelivery))
        self._notify()
        return update

    def redeliver(self, *updates: JSONDict) -> None:
        """Hand ``updates`` out again, as Telegram does with updates whose confirmation never
        arrived: a bot that crashed after handling a batch, before its next ``getUpdates`` told
        Telegram the new offset, is sent the whole batch again when it comes back."""
        for update in updates:
            self.add_update(update)

    @property
    def pending_updates(self) -> list[JSONDict]:
        """Updates queued and not yet confirmed by the client (delivered or not)."""
        return [entry.update for entry in self._queue]

    # ---------------------------------------------------------------- failure injection

    def fail_next(
        self,
        method: str,
        *,
        times: int = 1,
        error_code: int = 429,
        description: str | None = None,
        retry_after: int | None = None,
        migrate_to_chat_id: int | None = None,
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``error_code``.

        For 429 the answer is ``{"ok": false, "error_code": 429, "description": "Too Many
        Requests: retry after N", "parameters": {"retry_after": N}}`` (``retry_after`` defaults
        to 1), as Telegram sends it; ``retry_after``/``migrate_to_chat_id`` may be given for
        other codes too. ``description`` defaults to Telegram's text for the code (400 "Bad
        Request", 403 "Forbidden: bot was blocked by the user", 500 "Internal Server Error",
        502 "Bad Gateway" ...). Failures queue up per method, first in first out.
        """
        canonical = self._canonical(method)
        if error_code == 429 and retry_after is None:
            retry_after = 1
        if description is None:
            if error_code == 429:
                description = f"Too Many Requests: retry after {retry_after}"
            else:
                description = _DEFAULT_ERROR_DESCRIPTIONS.get(error_code, "Unknown error")
        parameters: JSONDict = {}
        if retry_after is not None:
            parameters["retry_after"] = retry_after
        if migrate_to_chat_id is not None:
            parameters["migrate_to_chat_id"] = migrate_to_chat_id
        self._failures.setdefault(canonical, []).append(
            _Failure(times, error_code, description, parameters or None)
        )

    def delay_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """Hold the answer to the next ``times`` calls of ``method`` for ``seconds`` (latency,
        client timeouts)."""
        self._delays.setdefault(self._canonical(method), []).extend([seconds] * times)

    # ---------------------------------------------------------------- inspection

    def messages_in(self, chat_id: int, thread_id: int | None = None) -> list[str]:
        """The current text (after edits, without deleted ones) of the bot's messages in a chat.

        Texts are as Telegram stores them: markup parsed away (the raw text is in
        :attr:`sent`). With ``thread_id`` only messages in that topic/thread are listed.
        """
        return [message.get("text", "") for message in self.bot_messages(chat_id, thread_id)]

    def bot_messages(self, chat_id: int, thread_id: int | None = None) -> list[JSONDict]:
        """The bot's current Message dicts in a chat, oldest first (see :meth:`messages_in`)."""
        state = self._chats.get(chat_id)
        if state is None:
            return []
        return [
            message
            for _, message in sorted(state.messages.items())
            if message.get("from", {}).get("id") == self.bot_id
            and (thread_id is None or message.get("message_thread_id") == thread_id)
        ]

    def message(self, chat_id: int, message_id: int) -> JSONDict:
        """A stored Message (user's or bot's), in its current state."""
        try:
            return self._chats[chat_id].messages[message_id]
        except KeyError:
            raise KeyError(f"no message {message_id} in chat {chat_id}") from None

    def calls_to(self, method: str) -> list[ApiCall]:
        """The recorded calls of one method (canonical or any-case name)."""
        canonical = self._canonical(method)
        return [call for call in self.calls if call.method == canonical]

    def member_status(self, chat_id: int, user_id: int) -> str:
        """The ChatMember status the fake will report for a user in a chat."""
        state = self._state_for(chat_id)
        member = state.members.get(user_id)
        return member["status"] if member else ("member" if user_id == self.bot_id else "left")

    @staticmethod
    def scope_key(scope: JSONDict | None = None, language_code: str | None = None) -> str:
        """The key of :attr:`commands` for a BotCommandScope dict and language code.

        ``"default"``, ``"all_private_chats"``, ``"chat:<id>"``, ``"chat_member:<chat>:<user>"``
        …, with ``"/<language>"`` appended when a language code is given.
        """
        scope = scope or {"type": "default"}
        parts = [scope.get("type", "default")]
        for key in ("chat_id", "user_id"):
            if key in scope:
                parts.append(str(scope[key]))
        key = ":".join(parts)
        return f"{key}/{language_code}" if language_code else key

    # ---------------------------------------------------------------- waiting

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Wait until ``predicate()`` is truthy and return its value.

        The predicate is re-checked whenever the recorded state changes (a call arrives or is
        answered, an update is queued). Raises :class:`TimeoutError` after ``timeout`` seconds,
        naming the last calls to help debugging.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = ", ".join(f"{c.method}->{c.status}" for c in self.calls[-8:])
                raise TimeoutError(
                    f"condition not met within {timeout}s; last calls: [{recent}]"
                )
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                self._waiters.discard(waiter)

    async def wait_for_message(
        self,
        chat_id: int,
        *,
        containing: str = "",
        thread_id: int | None = None,
        timeout: float = 5.0,
    ) -> JSONDict:
        """Wait until a bot message in the chat (and thread) contains ``containing``; return it.

        Edits count: a message edited to contain the text satisfies the wait.
        """

        def find() -> JSONDict | None:
            for message in self.bot_messages(chat_id, thread_id):
                if containing in message.get("text", ""):
                    return message
            return None

        return await self.wait_for(find, timeout)

    async def wait_for_call(
        self, method: str, *, count: int = 1, timeout: float = 5.0
    ) -> ApiCall:
        """Wait until ``method`` has been answered ``count`` times; return the last such call."""

        def answered() -> ApiCall | None:
            done = [call for call in self.calls_to(method) if call.status is not None]
            return done[count - 1] if len(done) >= count else None

        return await self.wait_for(answered, timeout)

    async def wait_until_delivered(self, timeout: float = 5.0) -> None:
        """Wait until every queued update has been handed out by ``getUpdates`` at least once."""
        await self.wait_for(lambda: all(entry.delivered for entry in self._queue), timeout)

    # ---------------------------------------------------------------- HTTP layer

    async def _handle_api(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        name = request.match_info["method"]
        canonical, handler = self._handlers.get(name.lower(), (name, None))
        call = ApiCall(canonical, {}, time.monotonic())
        self.calls.append(call)
        try:
            call.params = await self._read_params(request)
            self._notify()
            if token != self.token:
                well_formed = re.fullmatch(r"\d+:[\w-]+", token) is not None
                raise _ApiError(401, "Unauthorized") if well_formed else _ApiError(404, "Not Found")
            if handler is None:
                raise _ApiError(404, "Not Found")
            delays = self._delays.get(canonical)
            if delays:
                await asyncio.sleep(delays.pop(0))
            self._raise_injected_failure(canonical)
            result = await handler(call.params)
            status, body = 200, {"ok": True, "result": result}
        except _ApiError as error:
            status, body = error.error_code, error.body()
        call.status, call.response = status, body
        self._notify()
        return web.json_response(body, status=status)

    async def _handle_file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        path = request.match_info["path"]
        for file, content in self._files.values():
            if file["file_path"] == path:
                return web.Response(body=content, content_type="application/octet-stream")
        return web.json_response(
            {"ok": False, "error_code": 404, "description": "Not Found"}, status=404
        )

    @staticmethod
    async def _read_params(request: web.Request) -> JSONDict:
        params: JSONDict = {}
        raw: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            body = await request.read()
            if body:
                try:
                    decoded = json.loads(body)
                except ValueError:
                    raise _ApiError(400, "Bad Request: can't parse JSON object") from None
                if not isinstance(decoded, dict):
                    raise _ApiError(400, "Bad Request: can't parse JSON object")
                params.update(decoded)
        elif request.method == "POST":
            form = await request.post()
            for key, value in form.items():
                # file parts (multipart uploads) are kept as bytes, their names under "_filenames"
                if isinstance(value, web.FileField):
                    params.setdefault("_filenames", {})[key] = value.filename
                raw[key] = value.file.read() if isinstance(value, web.FileField) else value
        for key, value in raw.items():
            params[key] = _decode_form_value(key, value)
        return params

    def _raise_injected_failure(self, method: str) -> None:
        failures = self._failures.get(method)
        if not failures:
            return
        failure = failures[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            failures.pop(0)
        raise _ApiError(failure.error_code, failure.description, failure.parameters)

    # ---------------------------------------------------------------- Bot API methods

    async def _true(self, params: JSONDict) -> bool:
        return True

    async def _get_me(self, params: JSONDict) -> JSONDict:
        return {
            **self.bot_user,
            "can_join_groups": self.can_join_groups,
            "can_read_all_group_messages": not self.privacy_mode,
            "supports_inline_queries": self.supports_inline_queries,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _set_webhook(self, params: JSONDict) -> bool:
        self.webhook_url = str(params.get("url", ""))
        if params.get("drop_pending_updates"):
            self._queue.clear()
        return True

    async def _delete_webhook(self, params: JSONDict) -> bool:
        self.webhook_url = ""
        if params.get("drop_pending_updates"):
            self._queue.clear()
            self._notify()
        return True

    async def _get_webhook_info(self, params: JSONDict) -> JSONDict:
        return {
            "url": self.webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self._queue),
        }

    async def _get_updates(self, params: JSONDict) -> list[JSONDict]:
        if self.webhook_url:
            raise _ApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; use "
                "deleteWebhook to delete the webhook first",
            )
        offset = _as_int(params.get("offset"), "offset") or 0
        limit = min(max(_as_int(params.get("limit"), "limit") or 100, 1), 100)
        timeout = min(max(float(params.get("timeout") or 0), 0.0), MAX_POLL_TIMEOUT)
        if params.get("allowed_updates") is not None:
            self._allowed_updates = list(params["allowed_updates"])
        self._confirm(offset)

        # A newer getUpdates terminates an older one still waiting, as Telegram does.
        self._poll_generation += 1
        generation = self._poll_generation
        self._notify()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if generation != self._poll_generation:
                self.poll_conflicts += 1
                raise _ApiError(409, _DEFAULT_ERROR_DESCRIPTIONS[409])
            batch = self._take_batch(limit)
            remaining = deadline - loop.time()
            if batch or remaining <= 0 or self._closing:
                self._notify()
                return batch
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait({waiter}, timeout=remaining)
            finally:
                self._waiters.discard(waiter)

    async def _send_message(self, params: JSONDict) -> JSONDict:
        state = self._target_chat(params)
        text, entities = self._checked_text(params)
        thread_id = self._thread_for(state, params.get("message_thread_id"))
        reply_to = self._reply_target(state, params)
        if reply_to is not None and thread_id is None and reply_to.get("is_topic_message"):
            thread_id = reply_to.get("message_thread_id")  # replies land in the topic
        message: JSONDict = {
            "message_id": state.new_message_id(),
            "from": self.bot_user,
            "chat": dict(state.chat),
            "date": int(time.time()),
        }
        self._place_in_thread(state, message, thread_id, reply_to)
        message["text"] = text
        if entities:
            message["entities"] = entities
        if params.get("link_preview_options"):
            message["link_preview_options"] = params["link_preview_options"]
        markup = _inline_keyboard(params)
        if markup is not None:
            message["reply_markup"] = markup
        state.messages[message["message_id"]] = message
        self.sent.append(SentMessage(params, _copy(message)))
        return message

    async def _send_document(self, params: JSONDict) -> JSONDict:
        state = self._target_chat(params)
        document = params.get("document")
        if not isinstance(document, bytes):
            raise _ApiError(400, "Bad Request: the fake accepts uploaded documents only")
        filename = params.get("_filenames", {}).get("document", "document")
        reply_to = self._reply_target(state, params)
        message: JSONDict = {
            "message_id": state.new_message_id(),
            "from": self.bot_user,
            "chat": dict(state.chat),
            "date": int(time.time()),
        }
        self._place_in_thread(state, message, self._thread_for(state, params.get("message_thread_id")), reply_to)
        file_id = f"document-{next(self._file_ids)}"
        message["document"] = {
            "file_id": file_id,
            "file_unique_id": file_id,
            "file_name": filename,
            "file_size": len(document),
        }
        if params.get("caption"):
            message["caption"] = str(params["caption"])
        state.messages[message["message_id"]] = message
        self.documents.append(SentDocument(params, filename, document, _copy(message)))
        return message

    async def _edit_message_text(self, params: JSONDict) -> JSONDict:
        if params.get("inline_message_id"):
            raise _ApiError(400, "Bad Request: inline messages are not supported by the fake")
        state = self._target_chat(params)
        message_id = _as_int(params.get("message_id"), "message_id")
        if message_id is None:
            raise _ApiError(400, "Bad Request: message identifier is not specified")
        message = state.messages.get(message_id)
        if message is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if message.get("from", {}).get("id") != self.bot_id or "text" not in message:
            raise _ApiError(400, "Bad Request: message can't be edited")
        text, entities = self._checked_text(params)
        markup = _inline_keyboard(params)
        if (
            text == message.get("text")
            and entities == message.get("entities", [])
            and markup == message.get("reply_markup")
        ):
            raise _ApiError(400, _NOT_MODIFIED)
        previous = message.get("text", "")
        message["text"] = text
        if entities:
            message["entities"] = entities
        else:
            message.pop("entities", None)
        if markup is not None:
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        message["edit_date"] = int(time.time())
        self.edits.append(EditedMessage(params, previous, _copy(message)))
        return message

    async def _edit_message_reply_markup(self, params: JSONDict) -> JSONDict:
        if params.get("inline_message_id"):
            raise _ApiError(400, "Bad Request: inline messages are not supported by the fake")
        state = self._target_chat(params)
        message_id = _as_int(params.get("message_id"), "message_id")
        if message_id is None:
            raise _ApiError(400, "Bad Request: message identifier is not specified")
        message = state.messages.get(message_id)
        if message is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if message.get("from", {}).get("id") != self.bot_id:
            raise _ApiError(400, "Bad Request: message can't be edited")
        markup = _inline_keyboard(params)
        if markup == message.get("reply_markup"):
            raise _ApiError(400, _NOT_MODIFIED)
        if markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = markup
        message["edit_date"] = int(time.time())
        self.markup_edits.append((state.chat["id"], message_id, _copy(markup) if markup else None))
        return message

    async def _answer_callback_query(self, params: JSONDict) -> bool:
        query = str(params.get("callback_query_id") or "")
        if self._queries.get(query, True):  # unknown, or answered already
            raise _ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        text = params.get("text")
        if text is not None and len(str(text)) > 200:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        self._queries[query] = True
        show_alert = params.get("show_alert") in (True, "true")
        self.answers.append(CallbackAnswer(query, None if text is None else str(text), show_alert, params))
        return True

    async def _delete_message(self, params: JSONDict) -> bool:
        state = self._target_chat(params)
        message_id = _as_int(params.get("message_id"), "message_id")
        if message_id is None or message_id not in state.messages:
            raise _ApiError(400, "Bad Request: message to delete not found")
        del state.messages[message_id]
        self.deleted.append((state.chat["id"], message_id))
        return True

    async def _send_chat_action(self, params: JSONDict) -> bool:
        state = self._target_chat(params)
        action = params.get("action")
        if not action:
            raise _ApiError(400, "Bad Request: action is empty")
        if action not in CHAT_ACTIONS:
            raise _ApiError(400, "Bad Request: wrong parameter action in request")
        thread_id = self._thread_for(state, params.get("message_thread_id"))
        self.actions.append(ChatAction(state.chat["id"], action, thread_id, time.monotonic()))
        return True

    async def _set_my_commands(self, params: JSONDict) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise _ApiError(400, "Bad Request: parameter \"commands\" is required")
        if len(commands) > 100:
            raise _ApiError(400, "Bad Request: too many commands")
        for command in commands:
            name = command.get("command", "") if isinstance(command, dict) else ""
            description = command.get("description", "") if isinstance(command, dict) else ""
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
                raise _ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(description) <= 256:
                raise _ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        key = self.scope_key(params.get("scope"), params.get("language_code"))
        if commands:
            self.commands[key] = [
                {"command": c["command"], "description": c["description"]} for c in commands
            ]
        else:
            self.commands.pop(key, None)
        return True

    async def _get_my_commands(self, params: JSONDict) -> list[JSONDict]:
        key = self.scope_key(params.get("scope"), params.get("language_code"))
        return list(self.commands.get(key, []))

    async def _delete_my_commands(self, params: JSONDict) -> bool:
        self.commands.pop(self.scope_key(params.get("scope"), params.get("language_code")), None)
        return True

    async def _get_chat(self, params: JSONDict) -> JSONDict:
        state = self._target_chat(params)
        info = dict(state.chat)
        info.update(
            {
                "accent_color_id": 0,
                "max_reaction_count": 11,
                "accepted_gift_types": {
                    "unlimited_gifts": False,
                    "limited_gifts": False,
                    "unique_gifts": False,
                    "premium_subscription": False,
                    "gifts_from_channels": False,
                },
            }
        )
        return info

    async def _get_chat_member(self, params: JSONDict) -> JSONDict:
        state = self._target_chat(params)
        user_id = _as_int(params.get("user_id"), "user_id")
        if user_id is None:
            raise _ApiError(400, "Bad Request: user_id is empty")
        member = state.members.get(user_id)
        if member is not None:
            return member
        if user_id == self.bot_id:
            return self._member(self.bot_user, "member")
        user = self._users.get(user_id)
        if user is None:
            raise _ApiError(400, "Bad Request: user not found")
        return self._member(user, "left")

    async def _get_chat_administrators(self, params: JSONDict) -> list[JSONDict]:
        state = self._target_chat(params)
        if state.chat["type"] == "private":
            raise _ApiError(400, "Bad Request: there are no administrators in the private chat")
        admins = [m for m in state.members.values() if m["status"] == "creator"]
        admins += [m for m in state.members.values() if m["status"] == "administrator"]
        return admins

    async def _get_file(self, params: JSONDict) -> JSONDict:
        entry = self._files.get(str(params.get("file_id", "")))
        if entry is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        return dict(entry[0])

    # ---------------------------------------------------------------- internals

    def _canonical(self, method: str) -> str:
        return self._handlers.get(method.lower(), (method, None))[0]

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _register_chat(self, chat: JSONDict) -> _ChatState:
        state = _ChatState(chat)
        if chat.get("is_forum"):
            state.next_message_id = 2  # 1 is the General topic's: a created topic never gets it
        self._chats[chat["id"]] = state
        return state

    def _state_for(self, chat: JSONDict | int) -> _ChatState:
        chat_id = chat["id"] if isinstance(chat, dict) else chat
        state = self._chats.get(chat_id)
        if state is None:
            raise KeyError(f"unknown chat {chat_id}; create it with make_group() etc. first")
        return state

    def _target_chat(self, params: JSONDict) -> _ChatState:
        chat_id = params.get("chat_id")
        if chat_id in (None, ""):
            raise _ApiError(400, "Bad Request: chat_id is empty")
        if isinstance(chat_id, str) and chat_id.startswith("@"):
            for state in self._chats.values():
                if state.chat.get("username", "").lower() == chat_id[1:].lower():
                    return state
            raise _ApiError(400, "Bad Request: chat not found")
        try:
            state = self._chats.get(int(chat_id))
        except (TypeError, ValueError):
            state = None
        if state is None:
            raise _ApiError(400, "Bad Request: chat not found")
        return state

    def _checked_text(self, params: JSONDict) -> tuple[str, list[JSONDict]]:
        text = params.get("text")
        if text is None or str(text).strip() == "":
            raise _ApiError(400, "Bad Request: message text is empty")
        text = str(text)
        entities = params.get("entities")
        parse_mode = params.get("parse_mode")
        if entities:
            if not isinstance(entities, list):
                raise _ApiError(400, "Bad Request: can't parse entities JSON object")
        elif parse_mode:
            parser = _PARSERS.get(str(parse_mode).lower())
            if parser is None:
                raise _ApiError(400, "Bad Request: unsupported parse_mode")
            try:
                text, entities = parser(text)
            except _ParseError as error:
                raise _ApiError(400, f"Bad Request: can't parse entities: {error}") from None
        else:
            entities = []
        if text.strip() == "":
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > MAX_MESSAGE_LENGTH:
            raise _ApiError(400, "Bad Request: message is too long")
        return text, list(entities)

    def _thread_for(self, state: _ChatState, thread_id: Any) -> int | None:
        thread = _as_int(thread_id, "message_thread_id")
        if thread is None or state.chat["type"] != "supergroup":
            return None
        if state.chat.get("is_forum"):
            if thread not in state.topics and thread != 1:  # 1 is the General topic
                raise _ApiError(400, "Bad Request: message thread not found")
            return None if thread == 1 else thread
        if thread not in state.messages:
            raise _ApiError(400, "Bad Request: message thread not found")
        return thread

    def _reply_target(self, state: _ChatState, params: JSONDict) -> JSONDict | None:
        reply = params.get("reply_parameters")
        if isinstance(reply, dict):
            message_id = _as_int(reply.get("message_id"), "message_id")
            tolerate = bool(reply.get("allow_sending_without_reply"))
            if reply.get("chat_id") not in (None, state.chat["id"]):
                state = self._target_chat({"chat_id": reply["chat_id"]})
        else:
            message_id = _as_int(params.get("reply_to_message_id"), "reply_to_message_id")
            tolerate = bool(params.get("allow_sending_without_reply"))
        if message_id is None:
            return None
        target = state.messages.get(message_id)
        if target is None and not tolerate:
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return target

    def _place_in_thread(
        self,
        state: _ChatState,
        message: JSONDict,
        thread_id: int | None,
        reply_to: JSONDict | None,
    ) -> None:
        """Set message_thread_id / is_topic_message / reply_to_message as Telegram does."""
        if state.chat.get("is_forum"):
            if thread_id is not None:
                message["message_thread_id"] = thread_id
                message["is_topic_message"] = True
                if reply_to is None:
                    reply_to = state.messages.get(thread_id)
        elif state.chat["type"] == "supergroup":
            if thread_id is None and reply_to is not None:
                thread_id = reply_to.get("message_thread_id", reply_to["message_id"])
            if thread_id is not None:
                message["message_thread_id"] = thread_id
        if reply_to is not None:
            quoted = _copy(reply_to)
            quoted.pop("reply_to_message", None)  # Telegram does not nest replies
            message["reply_to_message"] = quoted

    def _add_user_message(
        self,
        chat: JSONDict | int,
        user: JSONDict,
        content: JSONDict,
        *,
        reply_to_message_id: int | None = None,
        message_thread_id: int | None = None,
        entities: list[JSONDict] | None = None,
        is_topic_message: bool | None = None,
    ) -> JSONDict:
        state = self._state_for(chat)
        self._users.setdefault(user["id"], user)
        if user["id"] not in state.members and state.chat["type"] != "private":
            state.members[user["id"]] = self._member(user, "member")
        if message_thread_id is not None and state.chat.get("is_forum"):
            if message_thread_id not in state.topics:
                raise KeyError(f"no topic {message_thread_id} in chat {state.chat['id']}")
        reply_to = None
        if reply_to_message_id is not None:
            reply_to = state.messages.get(reply_to_message_id)
            if reply_to is None:
                raise KeyError(f"no message {reply_to_message_id} in chat {state.chat['id']}")
            if message_thread_id is None and reply_to.get("is_topic_message"):
                message_thread_id = reply_to.get("message_thread_id")
        message: JSONDict = {
            "message_id": state.new_message_id(),
            "from": user,
            "chat": dict(state.chat),
            "date": int(time.time()),
        }
        self._place_in_thread(state, message, message_thread_id, reply_to)
        if is_topic_message is not None:
            if is_topic_message:
                message["is_topic_message"] = True
            else:
                message.pop("is_topic_message", None)
        message.update(content)
        if "text" in content:
            detected = entities if entities is not None else _detect_entities(content["text"])
            if detected:
                message["entities"] = detected
        state.messages[message["message_id"]] = message
        update = {"message": _copy(message)}
        if self._withheld_by_privacy(state, message):
            update["update_id"] = self._next_update_id()
            self.withheld.append(update)
            return update
        return self._enqueue(update)

    def _withheld_by_privacy(self, state: _ChatState, message: JSONDict) -> bool:
        if not self.privacy_mode or state.chat["type"] not in ("group", "supergroup"):
            return False
        if self.member_status(state.chat["id"], self.bot_id) in ("administrator", "creator"):
            return False
        text = message.get("text") or message.get("caption") or ""
        if text.startswith("/"):
            command = text.split()[0]
            return "@" in command and command.split("@", 1)[1].lower() != self.bot_username.lower()
        if f"@{self.bot_username}".lower() in text.lower():
            return False
        reply = message.get("reply_to_message")
        replies_to_bot = reply is not None and reply.get("from", {}).get("id") == self.bot_id
        return not (replies_to_bot or message.get("forum_topic_created"))

    def _register_file(self, data: bytes, *, width: int, height: int) -> JSONDict:
        number = next(self._file_ids)
        file_id = f"AgACAgFake{number:06d}"
        unique_id = f"AQADFake{number:06d}"
        file = {
            "file_id": file_id,
            "file_unique_id": unique_id,
            "file_size": len(data),
            "file_path": f"photos/file_{number}.bin",
        }
        self._files[file_id] = (file, data)
        return {
            "file_id": file_id,
            "file_unique_id": unique_id,
            "file_size": len(data),
            "width": width,
            "height": height,
        }

    def _member(self, user: JSONDict, status: str, **fields: Any) -> JSONDict:
        member: JSONDict = {"status": status, "user": user}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member.update(
                {
                    "can_be_edited": False,
                    "is_anonymous": False,
                    "can_manage_chat": True,
                    "can_delete_messages": True,
                    "can_manage_video_chats": True,
                    "can_restrict_members": True,
                    "can_promote_members": False,
                    "can_change_info": True,
                    "can_invite_users": True,
                    "can_post_stories": False,
                    "can_edit_stories": False,
                    "can_delete_stories": False,
                    "can_pin_messages": True,
                    "can_manage_topics": True,
                }
            )
        elif status == "restricted":
            member.update(
                {
                    "is_member": True,
                    "can_send_messages": False,
                    "can_send_audios": False,
                    "can_send_documents": False,
                    "can_send_photos": False,
                    "can_send_videos": False,
                    "can_send_video_notes": False,
                    "can_send_voice_notes": False,
                    "can_send_polls": False,
                    "can_send_other_messages": False,
                    "can_add_web_page_previews": False,
                    "can_change_info": False,
                    "can_invite_users": False,
                    "can_pin_messages": False,
                    "can_manage_topics": False,
                    "can_edit_tag": False,
                    "until_date": 0,
                }
            )
        elif status == "kicked":
            member["until_date"] = 0
        member.update(fields)
        return member

    def _next_update_id(self) -> int:
        self._last_update_id += 1
        return self._last_update_id

    def _enqueue(self, update: JSONDict) -> JSONDict:
        update = {"update_id": self._next_update_id(), **update}
        self._queue.append(_QueuedUpdate(update))
        self._notify()
        return update

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            self._queue = [
                entry
                for entry in self._queue
                if entry.update_id >= offset or (entry.redelivery and not entry.delivered)
            ]
        elif offset < 0:
            self._queue = self._queue[offset:]

    def _take_batch(self, limit: int) -> list[JSONDict]:
        allowed = set(self._allowed_updates)
        batch: list[JSONDict] = []
        for entry in self._queue:
            if len(batch) >= limit:
                break
            if allowed and entry.kind not in allowed:
                continue
            if not allowed and entry.kind in DEFAULT_EXCLUDED_UPDATES:
                continue
            entry.delivered = True
            batch.append(entry.update)
        return batch


def _inline_keyboard(params: JSONDict) -> JSONDict | None:
    """The ``reply_markup`` an edit or send asks for, when it is an inline keyboard with buttons (an
    empty one removes the keyboard, as does none)."""
    markup = params.get("reply_markup")
    if not isinstance(markup, dict) or not isinstance(markup.get("inline_keyboard"), list):
        return None
    for row in markup["inline_keyboard"]:
        for button in row:
            data = button.get("callback_data")
            if data is not None and not 1 <= len(str(data).encode()) <= 64:
                raise _ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
    return markup if any(markup["inline_keyboard"]) else None


def _copy(value: JSONDict) -> JSONDict:
    return json.loads(json.dumps(value))


def _as_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _ApiError(400, f"Bad Request: invalid {name} specified")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _ApiError(400, f"Bad Request: invalid {name} specified") from None


def _decode_form_value(key: str, value: Any) -> Any:
    if not isinstance(value, str) or key in _STRING_PARAMETERS:
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value

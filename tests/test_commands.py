"""Command parsing and argument checking (pure functions; the commands' effects are in test_core)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conversation import ParsedCommand, parse_command, parse_settings_args


@pytest.mark.parametrize(
    ("text", "username", "expected"),
    [
        ("/help", None, ParsedCommand("help", "")),
        ("/RESET  be terse ", None, ParsedCommand("reset", "be terse")),
        ("/system@parley_bot You are a pirate.", "Parley_Bot", ParsedCommand("system", "You are a pirate.")),
        ("/system@other_bot hi", "parley_bot", None),
        ("/set@x temperature=1", None, None),
        ("/set temperature=0.5\ntop_p=0.8", None, ParsedCommand("set", "temperature=0.5\ntop_p=0.8")),
        ("hello /help", None, None),
        ("/", None, None),
        ("/ help", None, None),
        ("/unknown stuff", None, ParsedCommand("unknown", "stuff")),
    ],
)
def test_parse_command(text, username, expected):
    assert parse_command(text, username) == expected


def test_settings_args_are_checked():
    assert parse_settings_args("temperature=0.7 top_p=1 max_new_tokens=64") == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_new_tokens": 64,
    }
    assert parse_settings_args("temperature=default") == {"temperature": None}
    for bad, message in [
        ("temperature=3", "temperature must be between 0 and 2"),
        ("top_p=0", "top_p must be between 0.01 and 1"),
        ("max_new_tokens=1.5", "max_new_tokens must be an integer"),
        ("max_new_tokens=0", "between 1 and 4096"),
        ("temperature=nan", "temperature must be a number"),
        ("temperature", "is not key=value"),
        ("seed=3", "unknown setting 'seed'"),
        ("", "nothing to set"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_settings_args(bad)


@settings(max_examples=3000)
@given(st.one_of(st.text(max_size=200), st.from_regex(r"/[a-zA-Z_]{1,8}(@[a-z_]{1,8})?( [a-z_]+=[-0-9.a-z]*){0,4}", fullmatch=True)))
def test_parsers_never_raise_anything_unexpected(text):
    parsed = parse_command(text, "bot")
    if parsed is not None:
        assert parsed.name == parsed.name.lower() and text.lstrip().startswith("/")
    try:
        values = parse_settings_args(text)
    except ValueError:
        return
    assert values and set(values) <= {"temperature", "top_p", "max_new_tokens"}

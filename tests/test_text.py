"""Whatever a platform delivers, normalized text is storable and safe to show the model."""

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.text import normalize_text


def test_examples():
    assert normalize_text("  hi\r\nthere\x00\x1b[31m  ") == "hi\nthere[31m"
    assert normalize_text("a\ud83dz") == "a\ufffdz"  # a lone surrogate (broken UTF-16)
    assert normalize_text("tab\there") == "tab\there"
    assert normalize_text("") == ""


@settings(max_examples=3000)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=300))
def test_normalized_text_is_clean(text):
    clean = normalize_text(text)
    clean.encode("utf-8")  # no lone surrogates left
    assert clean == clean.strip()
    assert "\r" not in clean
    assert all(c in "\n\t" or unicodedata.category(c) != "Cc" for c in clean)
    assert normalize_text(clean) == clean  # idempotent


def test_invisible_text_is_blank():
    for invisible in ("\u200b", "\u200c\u200d", " \u2060 ", "\ufeff", "\u200b\u200b\n\u200b", "\u2800", "\u3164", "\u00ad"):
        assert normalize_text(invisible) == "", repr(invisible)
    # Inside real text they stay: ZWJ joins emoji, ZWNJ shapes Persian words.
    assert normalize_text("\U0001F468\u200d\U0001F469\u200d\U0001F467") == "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    assert normalize_text("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645") == "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"

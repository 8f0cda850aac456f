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

"""Long replies are split at natural boundaries, never losing a word."""

from hypothesis import given
from hypothesis import strategies as st

from adapters.base import split_message


def test_splits_at_paragraphs_then_sentences_then_words():
    text = "First paragraph here.\n\nSecond one is longer. It has two sentences."
    assert split_message(text, 30) == ["First paragraph here.", "Second one is longer.", "It has two sentences."]
    assert split_message("short", 30) == ["short"]
    assert split_message("", 30) == [""]
    assert split_message("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]  # no boundary: hard cut


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400), st.integers(min_value=8, max_value=120))
def test_chunks_fit_and_keep_every_non_space_character(text, limit):
    chunks = split_message(text, limit)
    assert all(len(chunk) <= limit for chunk in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())

"""Cleaning what people send before it is stored or shown to the model."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text"]

# C0 and C1 control characters except tab and newline; DEL too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone UTF-16 surrogates (a platform sent broken text); they cannot be stored as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


# Characters that show nothing on their own: fillers that render as blank, besides the format
# characters (category Cf: zero-width space and joiners, word joiner, BOM, bidi marks, tags).
_BLANK_FILLERS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180e\u2800\u3164\uffa0") | frozenset(
    map(chr, range(0xFE00, 0xFE10))  # variation selectors
)


def _invisible(char: str) -> bool:
    return char.isspace() or char in _BLANK_FILLERS or unicodedata.category(char) == "Cf"


def normalize_text(text: str) -> str:
    """Line endings to \\n, control characters dropped, lone surrogates replaced by U+FFFD,
    surrounding whitespace stripped; a text of nothing visible (zero-width characters, fillers)
    becomes "". Zero-width characters inside real text stay (ZWJ joins emoji, ZWNJ shapes
    words). Safe for any str; the result encodes as UTF-8."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SURROGATE.sub("\ufffd", text)
    text = text.strip()
    return "" if all(map(_invisible, text)) else text

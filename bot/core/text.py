"""Cleaning what people send before it is stored or shown to the model."""

from __future__ import annotations

import re

__all__ = ["normalize_text"]

# C0 and C1 control characters except tab and newline; DEL too.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Lone UTF-16 surrogates (a platform sent broken text); they cannot be stored as UTF-8.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def normalize_text(text: str) -> str:
    """Line endings to \\n, control characters dropped, lone surrogates replaced by U+FFFD,
    surrounding whitespace stripped. Safe for any str; the result encodes as UTF-8."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _SURROGATE.sub("\ufffd", text)
    return text.strip()

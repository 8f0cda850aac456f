"""Model output (Markdown-ish) to the HTML subset Telegram accepts. Adapters fall back to plain
text whenever the platform still rejects the result, so this only has to be right for the
common cases: fenced code, inline code, bold."""

from __future__ import annotations

import html
import re

__all__ = ["markdown_to_telegram_html"]

_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", re.DOTALL)


def _inline(text: str) -> str:
    parts = _INLINE_CODE.split(text)
    out = []
    for index, part in enumerate(parts):
        if index % 2:
            out.append(f"<code>{html.escape(part, quote=False)}</code>")
        else:
            out.append(_BOLD.sub(r"<b>\1</b>", html.escape(part, quote=False)))
    return "".join(out)


def markdown_to_telegram_html(text: str) -> str:
    """Fenced blocks become <pre>, `code` becomes <code>, **bold** becomes <b>; everything else is
    escaped. An unclosed fence (a reply still streaming) is shown as code to its end."""
    segments = text.split("```")
    out = []
    for index, segment in enumerate(segments):
        if index % 2 == 0:
            out.append(_inline(segment))
            continue
        first, newline, rest = segment.partition("\n")
        language = first.strip()
        body = rest if newline and re.fullmatch(r"[\w+#.-]*", language) else segment
        code = html.escape(body.strip("\n"), quote=False)
        if language and body is rest:
            out.append(f'<pre><code class="language-{language}">{code}</code></pre>')
        else:
            out.append(f"<pre>{code}</pre>")
    return "".join(out)

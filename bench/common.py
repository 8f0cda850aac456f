"""Helpers the benchmarks share: the sections of the committed bench/RESULTS.md.

bench/RESULTS.md holds one section per benchmark (`throughput.py`, `chat.py`), each between
`<!-- begin NAME -->` and `<!-- end NAME -->`; a full run of one benchmark replaces its own section
and leaves the others as they are.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RESULTS_MD", "write_results_section"]

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_results_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the section `name` of `path` with `text`."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.is_file() else ""
    if old and "<!-- begin " not in old:
        # A file from before the sections: all of it was throughput.py's.
        old = f"<!-- begin throughput -->\n{old.rstrip()}\n<!-- end throughput -->\n"
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + block.rstrip("\n") + tail
    else:
        new = (old.rstrip("\n") + "\n\n" if old else "") + block
    path.write_text(new if new.endswith("\n") else new + "\n")

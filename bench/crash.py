"""Crash bench: the SIGKILL scenario of tests/test_crash.py (a real `parley run` against the
loopback Telegram fake, killed four times mid-burst, then restarted) run N times in a row. Prints
lost and duplicated for every run and writes bench/results/crash.json. Not part of the test run:

    .venv/bin/python bench/crash.py [--runs 20]

A duplicate counts as excused only when the earlier message's id was never persisted (the
platform posted it and the process died before the id reached the database); the verdict comes
from a log of every id the bot persisted, kept by a trigger in the database, not from timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.crash_scenario import run_crash_scenario  # noqa: E402
from tests.tiny_model import write_tiny_model  # noqa: E402


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="parley-crash-") as scratch:
        model_dir = write_tiny_model(Path(scratch) / "model")
        for number in range(1, args.runs + 1):
            folder = Path(scratch) / f"run-{number}"
            folder.mkdir()
            started = time.monotonic()
            report = await run_crash_scenario(model_dir, folder)
            seconds = time.monotonic() - started
            print(f"run {number:2d}: {report.line()}, unexcused {len(report.unexcused)}, "
                  f"wrong final text {len(report.wrong_final_text)} ({seconds:.0f} s)", flush=True)
            runs.append({
                "run": number, "sent": report.sent, "accepted": report.accepted, "answered": report.answered,
                "lost": len(report.lost), "duplicated": len(report.duplicated), "excused": len(report.excused),
                "unexcused": len(report.unexcused), "wrong_final_text": len(report.wrong_final_text),
                "seconds": round(seconds, 1),
            })
    bad = [r for r in runs if r["lost"] or r["unexcused"] or r["wrong_final_text"] or r["accepted"] != r["sent"]]
    total = {key: sum(r[key] for r in runs) for key in ("sent", "accepted", "lost", "duplicated", "excused", "unexcused")}
    print(f"{len(runs)} runs: {total}; runs with a loss, an unexcused duplicate or a wrong final text: {len(bad)}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash.json").write_text(json.dumps({"runs": runs, "total": total, "bad_runs": len(bad)}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

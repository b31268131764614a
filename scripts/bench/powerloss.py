"""Benchmark: power loss, many times over (tests/netns/powerloss.py does the work).

Each cycle starts meshpi-control and a control-mode agent (whichever is down),
lets two writer threads change prefs, add and remove hosted devices, rotate the
node key, approve routes and make pre-auth keys for a random 50-800 ms, then
SIGKILLs the agent (every cycle), control (70%) and wireguard-go (30%), and
checks the state on disk: every file loads, none is empty, control's SQLite
database passes `PRAGMA integrity_check`, and a temporary file of a cut-short
write does not outlive the agent's next start. At the end the node must come
back with the same machine key and addresses, and the node key on disk is the
one control and the kernel use.

A kill is not a power cut: the page cache survives it. What it does prove is
that no write is ever half-visible (every file is replaced by rename after an
fsync), which is what survives a real cut too, provided the fsyncs hold.

A progress line every 50 cycles; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.netns import powerloss  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="meshpi-powerloss-"))
    started = time.monotonic()

    def progress(t: powerloss.Tally) -> None:
        if t.cycles % 50 == 0 or t.cycles == args.cycles:
            print(f"{t.cycles}/{args.cycles} cycles, {time.monotonic() - started:.0f}s, "
                  f"{sum(t.writes.values())} writes, {len(t.problems)} problems", flush=True)  # fmt: skip

    try:
        figures = powerloss.run(scratch, args.cycles, args.seed, progress)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    ok = not figures["problem_count"] and all(figures["comeback"].values())
    figures["ok"] = ok
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

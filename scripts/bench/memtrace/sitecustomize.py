"""Loaded by Python's site module when this folder is on PYTHONPATH (scripts/bench/soak
--tracemalloc puts it there for the agent only): traces allocations and dumps a
tracemalloc snapshot every MESHPI_MEMTRACE_EVERY seconds (default 30) into the folder
MESHPI_MEMTRACE names, snap-0001.trace, snap-0002.trace, ... for the soak to compare."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path


def _dump_forever(folder: Path, every: float) -> None:
    n = 0
    while True:
        time.sleep(every)
        n += 1
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>"))
        )
        partial = folder / f"snap-{n:04d}.trace.part"
        snapshot.dump(str(partial))
        partial.rename(folder / f"snap-{n:04d}.trace")


if os.environ.get("MESHPI_MEMTRACE"):
    tracemalloc.start(int(os.environ.get("MESHPI_MEMTRACE_FRAMES", "8")))
    threading.Thread(
        target=_dump_forever,
        args=(Path(os.environ["MESHPI_MEMTRACE"]), float(os.environ.get("MESHPI_MEMTRACE_EVERY", "30"))),
        name="memtrace",
        daemon=True,
    ).start()

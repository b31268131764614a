"""kernel/heap.py: malloc_trim gives a fragmented thread arena's free pages back."""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.kernel import heap


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_heap_trim_releases_the_free_pages_a_burst_left_in_a_thread_arena() -> None:
    kept: list[bytes] = []

    def burst() -> None:  # a thread: its allocations go to a second glibc arena
        blocks = [bytes(4000) + bytes([i % 256]) for i in range(12_000)]  # ~48 MB, over pymalloc's 512 B
        kept.extend(blocks[::16])  # every 16th stays: the arena's free space is in between, not at its top
        blocks.clear()

    thread = threading.Thread(target=burst)
    thread.start()
    thread.join()
    before = _rss_kb()
    assert heap.trim()
    after = _rss_kb()
    assert before - after > 20_000, (before, after)  # tens of MB back; without the trim, none
    assert len(kept) == 750

"""The C heap's free pages, given back to the OS (glibc's `malloc_trim`).

The agent's bursts (a netlink dump of every peer parsed four times a second while
new peers are tried, a hundred deltas at once) leave glibc's arenas holding the
freed memory as their high-water mark: with 100 kernel WireGuard peers the
agent's second arena kept ~13 MB in the VM. glibc gives back only the free space
at the top of an arena by itself; `malloc_trim(0)` also releases the free pages in
between (madvise), in every arena. The loop calls `trim` every TRIM_EVERY seconds:
a walk over the arenas, ~1 ms. Without glibc (musl) it does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

TRIM_EVERY = 30.0  # seconds between trims in the agent's loop


def _load() -> Callable[[int], int] | None:
    # The process's own symbols: glibc is already mapped (no library search, no
    # `ldconfig -p` subprocess as ctypes.util.find_library would run).
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _load()


def trim() -> bool:
    """Release the C heap's free pages; False where there is no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True

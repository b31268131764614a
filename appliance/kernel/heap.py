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
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY = 30.0  # seconds between trims in the agent's loop


def _load() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
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

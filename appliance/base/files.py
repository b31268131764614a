"""The agent's small files, written so that a power cut loses nothing.

Every write goes to a temporary file in the same directory, is fsynced, and is
renamed over the old one; the directory is fsynced too. A reader sees the old
file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int | None = 0o644) -> None:
    """mode None: leave it (FAT, the boot partition, has no modes)."""
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_partial_writes(directory: Path) -> list[Path]:
    """Delete what an atomic_write cut short (killed, or the power lost, between
    mkstemp and the rename) left in `directory`: a `.<name>.<random>` file no one
    will ever rename. Only for a caller that knows no write is under way there
    (the agent, holding its state directory's lock, at start)."""
    removed = []
    for path in directory.glob(".*.*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Wait for files to change (inotify), without polling.

Watches the directories, not the files: editors and our own atomic writes
replace a file by renaming over it, which a watch on the old inode would miss.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Iterable
from pathlib import Path

_IN_MODIFY = 0x002
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class Watcher:
    """`wait(timeout)` returns the set of watched names that changed; an empty
    result means the timeout passed or `wake()` was called (from any thread)."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = {p.resolve() for p in files}
        self.fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.dirs: dict[int, Path] = {}
        for d in {p.parent for p in self.files}:
            wd = _libc.inotify_add_watch(
                self.fd, os.fsencode(d), _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_MODIFY
            )
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {d}")
            self.dirs[wd] = d
        # wake() interrupts the same select() through a pipe (self-pipe).
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self._sig_w, b"!")
        except OSError as e:  # closed already, or the pipe is full: either way it wakes
            if e.errno not in (errno.EBADF, errno.EAGAIN):
                raise

    def wait(self, timeout: float) -> set[Path]:
        ready, _, _ = select.select([self.fd, self._sig_r], [], [], max(timeout, 0))
        changed: set[Path] = set()
        if self._sig_r in ready:
            os.read(self._sig_r, 64)
        if self.fd in ready:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return changed
            offset = 0
            while offset < len(buf):
                wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                offset += _EVENT.size
                name = buf[offset : offset + length].rstrip(b"\0")
                offset += length
                path = self.dirs.get(wd, Path("/")) / os.fsdecode(name)
                if path in self.files:
                    changed.add(path)
        return changed

    def close(self) -> None:
        for fd in (self.fd, self._sig_r, self._sig_w):
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise

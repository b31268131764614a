"""Wait for files to change (inotify) or for a signal, without polling.

Watches the directories, not the files: editors and our own atomic writes
replace a file by renaming over it, which a watch on the old inode would miss.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import struct
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

_IN_MODIFY = 0x002
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class Watcher:
    """`wait(timeout)` returns the set of watched names that changed, or the
    signals that arrived; an empty result means the timeout passed."""

    def __init__(self, files: Iterable[Path], signals: Iterable[int] = ()) -> None:
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
        # Signals wake the same select() through a pipe (PEP 475-style self-pipe).
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signals: list[int] = []
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signum)
        os.write(self._sig_w, b"!")

    def wait(self, timeout: float) -> set[Path]:
        if self.signals:
            return set()
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

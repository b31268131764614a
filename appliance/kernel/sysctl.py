"""Sysctls: raw /proc/sys access, and the save/restore bookkeeping around it.

meshpi changes a few sysctls (forwarding, src_valid_mark, rp_filter) and puts
them back on `down`. The value each had before meshpi first touched it is
written to a small JSON file *before* the change, so an agent that crashes or
restarts still knows what to restore.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from pathlib import Path

from appliance.kernel.base import InterfaceNotFound, KernelError, PermissionDenied, ProcSys

log = logging.getLogger(__name__)

PROC_SYS = Path("/proc/sys")

# Directories whose entries are interface names, which may themselves contain
# dots (a VLAN `eth0.100`): net.ipv4.conf.eth0.100.rp_filter.
_PER_INTERFACE = frozenset(
    {
        ("net", "ipv4", "conf"),
        ("net", "ipv6", "conf"),
        ("net", "ipv4", "neigh"),
        ("net", "ipv6", "neigh"),
        ("net", "mpls", "conf"),
    }
)


class SysctlKeyError(KernelError, ValueError):
    """A key that cannot name a sysctl."""


class SysctlNotFound(KernelError, LookupError):
    """No such sysctl on this kernel."""


class OriginalsFileError(KernelError, ValueError):
    """The file of saved original values cannot be used."""


def key_parts(key: str) -> tuple[str, ...]:
    """The path components under /proc/sys for a dotted key.

    `net.ipv4.conf.eth0.100.rp_filter` -> (net, ipv4, conf, eth0.100, rp_filter).
    A key already written with slashes (net/ipv4/ip_forward) is taken as it is."""
    if "/" in key:
        parts = tuple(key.split("/"))
    else:
        dotted = key.split(".")
        if tuple(dotted[:3]) in _PER_INTERFACE and len(dotted) >= 5:
            parts = (*dotted[:3], ".".join(dotted[3:-1]), dotted[-1])
        else:
            parts = tuple(dotted)
    if any(part in ("", ".", "..") for part in parts):
        raise SysctlKeyError(f"sysctl key {key!r}: not a valid key")
    return parts


def key_path(key: str, root: Path = PROC_SYS) -> Path:
    return root.joinpath(*key_parts(key))


def normalise(value: str) -> str:
    """Values compare after stripping; multi-value sysctls (ip_local_port_range
    reads back as "32768\\t60999") with whitespace collapsed to single spaces."""
    return " ".join(value.split())


class ProcFs:
    """`ProcSys` on /proc/sys (per network namespace for net.*: the caller's)."""

    def __init__(self, root: Path = PROC_SYS) -> None:
        self._root = root

    def _error(self, verb: str, key: str, exc: OSError) -> KernelError:
        what = f"{verb} sysctl {key}"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return PermissionDenied(f"{what}: {exc.strerror}")
        if exc.errno == errno.ENOENT:
            parts = key_parts(key)
            if parts[:3] in _PER_INTERFACE and not key_path(key, self._root).parent.exists():
                return InterfaceNotFound(f"{what}: no such interface {parts[3]}")
            return SysctlNotFound(f"{what}: no such sysctl")
        return KernelError(f"{what}: {exc.strerror}")

    def read(self, key: str) -> str:
        try:
            return key_path(key, self._root).read_text().strip()
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def write(self, key: str, value: str) -> None:
        try:
            # One write() call: /proc/sys parses each write on its own.
            with key_path(key, self._root).open("w") as f:
                f.write(value)
        except OSError as exc:  # EINVAL for a value the kernel rejects
            raise self._error(f"write {value!r} to", key, exc) from exc


def _gone(exc: KernelError) -> bool:
    """The sysctl itself no longer exists (its interface was deleted, say)."""
    return isinstance(exc, LookupError)  # InterfaceNotFound or SysctlNotFound


class Sysctls:
    """The sysctls meshpi has changed, with their original values kept in `originals`."""

    def __init__(self, procsys: ProcSys, originals: Path) -> None:
        self._sys = procsys
        self._path = originals
        self._saved: dict[str, str] | None = None  # loaded on first use

    # -- the originals file -------------------------------------------------

    def _load(self) -> dict[str, str]:
        if self._saved is not None:
            return self._saved
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            self._saved = {}
            return self._saved
        except OSError as exc:
            raise OriginalsFileError(f"{self._path}: cannot read: {exc.strerror}") from exc
        try:
            data = json.loads(raw)  # bad UTF-8 is a ValueError too
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()
            ):
                raise ValueError("expected an object of key -> value strings")
        except ValueError as exc:
            # Move it aside, so the next start does not fail the same way again;
            # a human can still read the values out of the copy.
            aside = self._path.with_name(self._path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self._path, aside)
            raise OriginalsFileError(
                f"{self._path}: corrupt ({exc}); moved to {aside}, "
                "original sysctl values in it will not be restored"
            ) from exc
        self._saved = dict(data)
        return self._saved

    def _store(self, saved: dict[str, str]) -> None:
        """Write the file atomically and durably: temp file, fsync, rename, fsync dir."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if saved:
                tmp = self._path.with_name(f".{self._path.name}.tmp")
                with tmp.open("w") as f:
                    json.dump(saved, f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path)
            else:  # nothing left to restore: leave no state behind
                self._path.unlink(missing_ok=True)
            dir_fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise OriginalsFileError(f"{self._path}: cannot write: {exc.strerror}") from exc
        self._saved = saved

    # -- the API ------------------------------------------------------------

    def managed(self) -> dict[str, str]:
        """Current values of the sysctls meshpi changed and has not restored yet.
        A sysctl that no longer exists (its interface is gone) is left out."""
        current: dict[str, str] = {}
        for key in self._load():
            try:
                current[key] = normalise(self._sys.read(key))
            except KernelError as exc:
                if not _gone(exc):
                    raise
                log.debug("sysctl %s: gone, not reporting it", key)
        return current

    def original(self, key: str) -> str | None:
        return self._load().get(key)

    def before_meshpi(self, key: str) -> str:
        """The value `key` had before meshpi changed it: the recorded original,
        or, while meshpi has not touched it, simply the current value."""
        recorded = self.original(key)
        return recorded if recorded is not None else normalise(self._sys.read(key))

    def set(self, key: str, value: str) -> None:
        saved = self._load()
        fresh = key not in saved
        if fresh:
            # Record first: if we crash right after the write, the file still
            # knows what to put back.
            self._store({**saved, key: normalise(self._sys.read(key))})
        try:
            self._sys.write(key, value)
        except KernelError:
            if fresh:  # nothing changed, so nothing to restore
                self._store({k: v for k, v in self._load().items() if k != key})
            raise

    def restore(self, key: str) -> None:
        saved = self._load()
        if key not in saved:
            return
        try:
            self._sys.write(key, saved[key])
        except KernelError as exc:
            if not _gone(exc):
                raise
            log.debug("sysctl %s: gone, nothing to restore", key)
        self._store({k: v for k, v in saved.items() if k != key})

    def restore_all(self) -> None:
        """Restore every key, newest change first; keep going past failures and
        raise them together."""
        errors: list[Exception] = []
        for key in reversed(list(self._load())):
            try:
                self.restore(key)
            except KernelError as exc:
                errors.append(exc)
        if errors:
            raise ExceptionGroup("restoring sysctls", errors)

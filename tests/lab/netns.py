"""Network namespaces for tests and the lab: create, run in, enter, always remove.

Names carry the creating PID (like wireguard-go's tests/netns.sh), so leftovers
from a crashed run are easy to spot and never collide with a live run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/var/run/netns")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def create(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def delete(name: str) -> None:
    """Stop every process in the namespace, then remove it. Safe to call twice.

    SIGTERM first: wireguard-go then removes its socket from the directory that
    all namespaces share, instead of leaving a stale one for the next run."""
    for attempt in range(60):
        live = pids(name)
        if not live:
            break
        sig = signal.SIGTERM if attempt < 10 else signal.SIGKILL
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.02)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run(
    name: str, cmd: Sequence[str], check: bool = True, timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a command inside the namespace and capture its output as text."""
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        ["ip", "netns", "exec", name, *cmd],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Move this (single-threaded) process into the namespace for the block.

    Netlink sockets, /proc/sys/net and child processes opened inside the block
    all belong to the namespace."""
    with open("/proc/self/ns/net", "rb") as home, open(NETNS_DIR / name, "rb") as target:
        _setns(target.fileno())
        try:
            yield
        finally:
            _setns(home.fileno())


def leftovers(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(prefix)]

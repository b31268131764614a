"""Remove what crashed lab runs left behind: namespaces, wireguard-go, sockets, scratch dirs.

A lab namespace is `mp<pid>[x<n>]-<role>` (tests.lab.topology) or `mpt<pid>n<n>`
(the netns fixture). The PID says whose it is, so a live run's namespaces are left
alone unless forced. wireguard-go is only ever killed when it runs outside the
host's own network namespace: a real meshpi0 on this machine is not ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab import netns

logger = logging.getLogger(__name__)

LAB_NAMESPACE = re.compile(r"^mpt?(?P<pid>\d+)(?:[xn]\d+)?(?:-[a-z0-9]+)?$")
LAB_INTERFACE = re.compile(r"^meshpi\d+$")
WG_SOCKET_DIR = Path("/var/run/wireguard")


@dataclass(frozen=True)
class WireGuardGo:
    pid: int
    interface: str
    net_inode: int


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has already closed its files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _net_inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:  # the process or namespace went away while we looked
        return None


def lab_namespaces() -> dict[str, int]:
    """Every lab-looking namespace -> the PID of the run that created it."""
    found = {}
    for name in netns.leftovers("mp"):
        match = LAB_NAMESPACE.match(name)
        if match:
            found[name] = int(match["pid"])
    return found


def wireguard_go_processes() -> list[WireGuardGo]:
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if not args or Path(args[0]).name != "wireguard-go":
            continue
        iface = next((a for a in reversed(args) if LAB_INTERFACE.match(a)), None)
        inode = _net_inode(entry / "ns" / "net")
        if iface and inode is not None:
            procs.append(WireGuardGo(int(entry.name), iface, inode))
    return procs


def _socket_stale(path: Path) -> bool:
    """The same test wireguard-go makes before it reuses a socket path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def kill_wireguard_go_in(namespaces: list[str]) -> list[WireGuardGo]:
    """SIGKILL every wireguard-go serving a meshpi interface inside these namespaces,
    and wait until all of them (also ones already dying) have exited."""
    inodes = {_net_inode(netns.NETNS_DIR / name) for name in namespaces} - {None}
    found = [p for p in wireguard_go_processes() if p.net_inode in inodes]
    for proc in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    # Only once they are gone are their sockets closed, and provably stale.
    deadline = time.monotonic() + 5
    while any(_running(p.pid) for p in found) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def remove_stale_sockets(interfaces: list[str] | None = None) -> list[Path]:
    """Remove UAPI sockets nobody listens on (all meshpi* ones, or just these)."""
    removed: list[Path] = []
    if not WG_SOCKET_DIR.is_dir():
        return removed
    for sock in WG_SOCKET_DIR.glob("meshpi*.sock"):
        if interfaces is not None and sock.stem not in interfaces:
            continue
        if _socket_stale(sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
                removed.append(sock)
    return removed


def cleanup(force: bool = False) -> list[str]:
    """Remove leftovers; returns one line per thing removed.

    wireguard-go is killed when it runs in a doomed namespace, or in a namespace that
    no longer has a name (its run deleted the name but the process kept it alive);
    never in the host's namespace or a live run's."""
    doomed: list[str] = []
    for name, pid in lab_namespaces().items():
        if _alive(pid) and not force:
            logger.info("keeping %s: its run (pid %d) is still alive", name, pid)
            continue
        doomed.append(name)
    named = {_net_inode(netns.NETNS_DIR / name) for name in netns.leftovers("")}
    doomed_inodes = {_net_inode(netns.NETNS_DIR / name) for name in doomed}
    keep = (named - doomed_inodes) | {_net_inode("/proc/1/ns/net")}
    done: list[str] = []
    for proc in wireguard_go_processes():
        if proc.net_inode in keep:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            done.append(f"killed wireguard-go pid {proc.pid} ({proc.interface})")
    for name in doomed:
        netns.delete(name)
        done.append(f"deleted namespace {name}")
    done += [f"removed stale socket {sock}" for sock in remove_stale_sockets()]
    # Scratch dirs are named like the namespaces (meshpi-lab-<pid>[x<n>]-<random>).
    for scratch in Path(tempfile.gettempdir()).glob("meshpi-lab-*"):
        match = re.match(r"meshpi-lab-(\d+)", scratch.name)
        if match and scratch.is_dir() and (force or not _alive(int(match[1]))):
            shutil.rmtree(scratch, ignore_errors=True)
            done.append(f"removed scratch dir {scratch}")
    return done

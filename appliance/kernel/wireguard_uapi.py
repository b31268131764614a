"""WireGuard through the cross-platform userspace API (wireguard-go, boringtun).

The daemon listens on /var/run/wireguard/<ifname>.sock and speaks the text protocol
of https://www.wireguard.com/xplatform/: `get=1` dumps the device, `set=1` applies
one transaction; both replies end with `errno=N` and an empty line.

That socket directory is shared by every network namespace, while the device it
controls lives in one. So a socket only counts as "this interface" if it is
listed in this namespace's /proc/net/unix (unix sockets belong to the netns that
created them), and the link exists here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    PermissionDenied,
    WgDevice,
    WgUpdate,
    WireGuardUnavailable,
)
from appliance.kernel.uapi_text import iter_update, parse_device, reply_errno
from appliance.kernel.wireguard import check_ifname, check_update, summary

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
START_TIMEOUT = 5.0  # wireguard-go is up in ~10 ms; 5 s covers a loaded Pi
IO_TIMEOUT = 30.0  # a 1,000-peer set takes well under a second
_POLL_INTERVAL = 0.005
_RECV_SIZE = 1 << 16

# wireguard-go hands these to its own daemonised child; inherited from our
# environment they would make it run in the foreground (and block us) or adopt
# file descriptors that are not its own. LOG_LEVEL would make the daemon keep our
# stdout/stderr pipes open, so `create` would never see EOF.
_DAEMON_ENV_DROP = ("WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD", "LOG_LEVEL")

_ERRNO_MEANING = {
    errno.EINVAL: "rejected a value as invalid",
    errno.EADDRINUSE: "cannot bind the listen port: it is already in use",
    errno.EPROTO: "did not understand the request",
    errno.EIO: "failed while applying it",
}


# --- the backend ---------------------------------------------------------------


class UapiWireGuard:
    """wireguard-go devices, driven over their UAPI sockets."""

    name = "userspace"

    def __init__(
        self,
        socket_dir: Path = SOCKET_DIR,
        wireguard_go: str = "wireguard-go",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.socket_dir = socket_dir
        self.wireguard_go = wireguard_go
        self.start_timeout = start_timeout

    def socket_path(self, ifname: str) -> Path:
        return self.socket_dir / f"{ifname}.sock"

    def create(self, ifname: str) -> None:
        check_ifname(ifname)
        path = self.socket_path(ifname)
        if self._listening_here(ifname):
            if _link_exists(ifname):
                log.debug("%s: wireguard-go already runs it", ifname)
                return
            # The link was just deleted and its daemon is on its way out; a new
            # one could not take the socket until the old one lets go of it.
            self._wait_until_released(ifname)
        elif _answers(path):
            raise KernelError(
                f"{ifname}: {path} belongs to a WireGuard daemon in another network namespace; "
                "the socket directory is shared, so pick an interface name unique on this host"
            )
        if _link_exists(ifname):
            raise KernelError(f"{ifname}: a link with this name exists and is not run by wireguard-go")
        exe = shutil.which(self.wireguard_go)
        if exe is None:
            raise WireGuardUnavailable(f"{self.wireguard_go} is not installed (not found on PATH)")
        env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ENV_DROP}
        # Newer kernels have the module; wireguard-go then asks for this before it runs.
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        try:
            # wireguard-go daemonises: the process we start exits once its child
            # holds the TUN device and the socket. A new session keeps that child
            # out of our process group, so a signal to the agent's group (Ctrl-C in
            # a terminal) leaves the device forwarding, as does the agent dying.
            done = subprocess.run(
                [exe, ifname],
                capture_output=True,
                text=True,
                env=env,
                timeout=self.start_timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise WireGuardUnavailable(
                f"{exe} {ifname} did not daemonise within {self.start_timeout:g} s"
            ) from e
        except OSError as e:
            raise WireGuardUnavailable(f"cannot run {exe}: {e.strerror}") from e
        if done.returncode != 0:
            raise WireGuardUnavailable(
                f"{exe} {ifname} failed (exit {done.returncode}): {_stderr_gist(done.stderr)}"
            )
        self._wait_until_answering(ifname)
        log.info("created %s (wireguard-go, socket %s)", ifname, path)

    def read(self, ifname: str) -> WgDevice | None:
        check_ifname(ifname)
        try:
            lines = self._transact(ifname, b"get=1\n\n")
        except InterfaceNotFound:
            return None
        code = reply_errno(lines)
        if code:
            raise self._error(ifname, "get", code)
        return parse_device(lines[:-1])

    def configure(self, ifname: str, update: WgUpdate) -> None:
        check_ifname(ifname)
        check_update(update)
        lines = self._transact(ifname, iter_update(update))
        code = reply_errno(lines)
        if code:
            raise self._error(ifname, "set", code, update)
        # The caller logs each change; this is the transport's view, for debugging.
        log.debug("%s: applied %s", ifname, summary(update))

    # --- plumbing -------------------------------------------------------------

    def _listening_here(self, ifname: str) -> bool:
        """Is the socket listed in this network namespace's /proc/net/unix?"""
        suffix = f"/{self.socket_dir.name}/{ifname}.sock"
        try:
            with open("/proc/thread-self/net/unix", encoding="utf-8", errors="replace") as f:
                return any(line.rstrip("\n").endswith(suffix) for line in f)
        except FileNotFoundError:  # no procfs (a container without /proc): trust the path
            return self.socket_path(ifname).exists()

    def _wait_until_released(self, ifname: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while self._listening_here(ifname):
            if time.monotonic() > deadline:
                raise KernelError(
                    f"{ifname}: the old wireguard-go still holds {self.socket_path(ifname)} "
                    f"{self.start_timeout:g} s after its link was deleted"
                )
            time.sleep(_POLL_INTERVAL)

    def _wait_until_answering(self, ifname: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            with contextlib.suppress(InterfaceNotFound):
                if reply_errno(self._transact(ifname, b"get=1\n\n")) == 0:
                    return
            if time.monotonic() > deadline:
                raise WireGuardUnavailable(
                    f"wireguard-go started for {ifname} but {self.socket_path(ifname)} "
                    f"did not answer within {self.start_timeout:g} s"
                )
            time.sleep(_POLL_INTERVAL)

    def _transact(self, ifname: str, request: bytes | Iterable[bytes]) -> list[str]:
        """Send one request and return the reply's lines (errno line last).

        Raises InterfaceNotFound when there is no live device of that name here."""
        path = self.socket_path(ifname)
        missing = InterfaceNotFound(
            f"{ifname}: no WireGuard device (no live {path} in this network namespace)"
        )
        if not self._listening_here(ifname) or not _link_exists(ifname):
            raise missing
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            try:
                sock.connect(str(path))
                for chunk in [request] if isinstance(request, bytes) else request:
                    sock.sendall(chunk)
                reply = _recv_reply(sock)
            except (
                FileNotFoundError,
                ConnectionRefusedError,
                ConnectionResetError,
                BrokenPipeError,
            ) as e:
                # The daemon went away between the check and the request (link deleted).
                raise missing from e
            except PermissionError as e:
                raise PermissionDenied(f"{ifname}: no permission to open {path}") from e
            except TimeoutError as e:
                raise KernelError(f"{ifname}: wireguard-go did not answer within {IO_TIMEOUT:g} s") from e
            except OSError as e:
                raise KernelError(f"{ifname}: talking to {path} failed: {e.strerror}") from e
        if not reply:
            raise missing  # closed without a word: the daemon is shutting down
        return reply.decode("utf-8", errors="replace").rstrip("\n").split("\n")

    def _error(self, ifname: str, op: str, code: int, update: WgUpdate | None = None) -> KernelError:
        meaning = _ERRNO_MEANING.get(code, os.strerror(code))
        if code == errno.EADDRINUSE and update is not None and update.listen_port is not None:
            meaning = f"cannot bind listen port {update.listen_port}: it is already in use"
        partly = "; earlier parts of the update may have been applied" if op == "set" else ""
        name = errno.errorcode.get(code, str(code))
        err_type = PermissionDenied if code in (errno.EPERM, errno.EACCES) else KernelError
        return err_type(f"{ifname}: wireguard-go {meaning} ({op}, {name}){partly}")


def _recv_reply(sock: socket.socket) -> bytes:
    """Read until the empty line that ends every reply (or EOF)."""
    buf = bytearray()
    while not buf.endswith(b"\n\n"):
        chunk = sock.recv(_RECV_SIZE)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _link_exists(ifname: str) -> bool:
    # if_nametoindex asks the kernel through a socket in *this* netns; /sys/class/net
    # would show the namespace that mounted sysfs instead.
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _stderr_gist(stderr: str) -> str:
    # Newer kernels make wireguard-go print a boxed "you have the kernel module"
    # banner; it is noise next to the real error.
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and ln.strip()[0] not in "┌│└"]
    return " / ".join(lines)[-500:] or "(no output)"

"""The network around the image's VM for its end-to-end test, in network namespaces.

    vmnet   a router: forwards, no NAT; DHCP for the VM (busybox udhcpd)
     |- tap0    10.99.0.1/24    <- qemu; the VM gets 10.99.0.2 (its "home LAN")
     |- client  10.98.0.1/24    -- veth -- [client] eth0 10.98.0.2/24 gw .1
     |                                     a laptop: wireguard-go + a meshpi agent
     `- server  203.0.113.1/24  -- veth -- [server] eth0 203.0.113.10/24 gw .1
                                           "the internet": a whoami server

The client reaches the VM's control and WireGuard port directly. What the server
sees tells the path: 10.98.0.2 when the client goes direct, 10.99.0.2 (the VM,
masquerading) when the client uses the VM as its exit node.

Namespaces are named mp<pid>i-<role> (tests/lab's scheme, an "i" for image), and
the tools of tests/lab (Host.fetch, whoami servers) work in them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.lab import netns
from tests.lab.host import Host, LabError, ToolServer, wait_for

log = logging.getLogger(__name__)

VM_V4, VMNET_V4 = "10.99.0.2", "10.99.0.1"
CLIENT_V4 = "10.98.0.2"
SERVER_V4 = "203.0.113.10"
TAP = "tap0"

_SETUP = {
    "vmnet": [
        f"tuntap add dev {TAP} mode tap",
        f"addr add {VMNET_V4}/24 dev {TAP}",
        f"link set {TAP} up",
        "link add client index 101 type veth peer name eth0 netns {client}",
        "link add server index 102 type veth peer name eth0 netns {server}",
        "addr add 10.98.0.1/24 dev client",
        "addr add 203.0.113.1/24 dev server",
        "link set client up",
        "link set server up",
    ],
    "client": [f"addr add {CLIENT_V4}/24 dev eth0", "link set eth0 up", "route add default via 10.98.0.1"],
    "server": [f"addr add {SERVER_V4}/24 dev eth0", "link set eth0 up", "route add default via 203.0.113.1"],
}

_UDHCPD = """\
start {vm}
end {vm}
interface {tap}
max_leases 1
lease_file {scratch}/udhcpd.leases
pidfile {scratch}/udhcpd.pid
opt subnet 255.255.255.0
opt router {router}
opt lease 86400
"""


class VmNet:
    """The topology above, as a context manager; teardown always runs."""

    def __init__(self) -> None:
        self.prefix = f"mp{os.getpid()}i-"
        self.hosts = {role: Host(self, role, self.prefix + role) for role in _SETUP}  # type: ignore[arg-type]
        self.vmnet, self.client, self.server = self.hosts["vmnet"], self.hosts["client"], self.hosts["server"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix=f"meshpi-vmnet-{os.getpid()}-"))
        self._created: list[str] = []
        self._whoami: ToolServer | None = None

    def internet(self) -> ToolServer:
        """The whoami server in the server namespace, started by the first test that
        needs it and kept for the session: every laptop's via_vm() asks it, whichever
        subset of the tier (-k) runs."""
        if self._whoami is None or self._whoami.proc.poll() is not None:
            self._whoami = self.server.whoami_server()
        return self._whoami

    def __enter__(self) -> VmNet:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def up(self) -> None:
        if shutil.which("busybox") is None:
            raise LabError("busybox (its udhcpd) is needed for the VM's DHCP: apt-get install busybox")
        names = {role: host.ns for role, host in self.hosts.items()}
        for host in self.hosts.values():
            netns.create(host.ns)
            self._created.append(host.ns)
        for role, lines in _SETUP.items():
            batch = "\n".join(line.format(**names) for line in lines) + "\n"
            self.hosts[role].run(["ip", "-batch", "-"], input=batch)
        for role, host in self.hosts.items():
            on = "1" if role == "vmnet" else "0"
            host.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={on}"])
        conf = self.scratch / "udhcpd.conf"
        conf.write_text(_UDHCPD.format(vm=VM_V4, tap=TAP, scratch=self.scratch, router=VMNET_V4))
        (self.scratch / "udhcpd.leases").touch()
        self.vmnet.popen(["busybox", "udhcpd", "-f", str(conf)], log=self.scratch / "udhcpd.log")

    def stop_process(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop_process(proc)
        self.procs.clear()
        for name in reversed(self._created):
            netns.delete(name)
        self._created.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def leases(self) -> str:
        return (self.scratch / "udhcpd.log").read_text(errors="replace")


def wait_until(predicate: object, timeout: float, what: str, interval: float = 1.0) -> object:
    started = time.monotonic()
    value = wait_for(predicate, timeout, what, interval)  # type: ignore[arg-type]
    log.info("%s after %.1f s", what, time.monotonic() - started)
    return value

"""The lab: a small internet in network namespaces, for the demo and the netns tests.

Every name below is a namespace called `mp<run id>-<role>` (e.g. `mp4242-pi`); the
run id is the creating PID, so parallel runs don't collide and leftovers of a
crashed run are recognisable (`python -m tests.lab down` removes them). Veths are
created straight inside the namespaces (`peer ... netns`), never in the host's
own namespace, so their short names (<= 15 chars) cannot collide either.

    inet  "the internet": a router, and the server on lo: 203.0.113.10/32, 2001:db8:ff00::10/128
     |  route 2001:db8:1::/64 via home (home's LAN is routed for v6, not NATed)
     |
     +-- [home]198.51.100.254 / 2001:db8:ff01::fe --veth-- [wan]198.51.100.1/24, 2001:db8:ff01::1/64
     |   home  "home router": masquerade 192.168.77.0/24 out wan;
     |         DNAT udp 51820 on wan -> 192.168.77.2:51820 (a hand-made port forward);
     |         optional PMTU black hole: drops ICMP frag-needed / ICMPv6 packet-too-big
     |     br0 192.168.77.1/24, 2001:db8:1::1/64
     |      +-- [pi]--veth--[eth0] pi       192.168.77.2/24 gw .1;  2001:db8:1::2/64 gw ::1
     |      +-- [lanhost]--veth--[eth0] lanhost  192.168.77.3/24 gw .1;  2001:db8:1::3/64 gw ::1
     |
     +-- [lrouter]192.0.2.254 --veth-- [wan]192.0.2.1/24
         lrouter  "laptop's router" (IPv4 only): masquerade 10.77.0.0/24 out wan
           br0 10.77.0.1/24
            +-- [laptop]--veth--[eth0] laptop   10.77.0.2/24 gw .1
            +-- [laptop2]--veth--[eth0] laptop2  10.77.0.3/24 gw .1   (only with Lab(laptop2=True))

inet, home and lrouter forward; the pi, lanhost and laptops do not (meshpi turns
forwarding on by itself on the pi). All IPv6 addresses are added `nodad`, so they
are usable at once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from tests.lab import netns
from tests.lab.host import (  # re-exported: tests import everything lab-related from here
    WHOAMI_PORT,
    WIREGUARD_PORT,
    Host,
    LabError,
    PingResult,
    ToolServer,
    parse_ping,
    wait_for,
)

__all__ = ["WHOAMI_PORT", "WIREGUARD_PORT", "Host", "Lab", "LabError", "PingResult",
           "ToolServer", "parse_ping", "wait_for"]  # fmt: skip

logger = logging.getLogger(__name__)

SERVER_V4 = "203.0.113.10"
SERVER_V6 = "2001:db8:ff00::10"
HOME_WAN_V4 = "198.51.100.1"
HOME_WAN_V6 = "2001:db8:ff01::1"
HOME_LAN_V4 = "192.168.77.0/24"
HOME_LAN_V6 = "2001:db8:1::/64"
PI_V4, PI_V6 = "192.168.77.2", "2001:db8:1::2"
LANHOST_V4, LANHOST_V6 = "192.168.77.3", "2001:db8:1::3"
LAPTOP_ROUTER_WAN_V4 = "192.0.2.1"
LAPTOP_V4, LAPTOP2_V4 = "10.77.0.2", "10.77.0.3"

ROUTERS = ("inet", "home", "lrouter")
_lab_counter = itertools.count()


# Per namespace: `ip -batch` lines; {role} is that role's namespace name.
_LINKS: dict[str, list[str]] = {
    # Each veth is made in the first namespace with its peer directly in the second.
    # The first end gets an explicit ifindex: a fresh namespace numbers from 2, and a
    # veth whose ifindex equals its peer's looks to the kernel's linkwatch like a plain
    # device, so carrier-up is handled as non-urgent: operstate (and with it the IPv6
    # link-local address that NDP needs) then lags by 1 s.
    "inet": [
        "link add home index 101 type veth peer name wan netns {home}",
        "link add lrouter index 102 type veth peer name wan netns {lrouter}",
    ],
    "home": [
        "link add br0 type bridge forward_delay 0",
        "link add pi index 103 type veth peer name eth0 netns {pi}",
        "link add lanhost index 104 type veth peer name eth0 netns {lanhost}",
    ],
    "lrouter": [
        "link add br0 type bridge forward_delay 0",
        "link add laptop index 105 type veth peer name eth0 netns {laptop}",
    ],
}
_ADDRS: dict[str, list[str]] = {
    "inet": [
        f"addr add {SERVER_V4}/32 dev lo",
        f"addr add {SERVER_V6}/128 dev lo",
        "addr add 198.51.100.254/24 dev home",
        "addr add 2001:db8:ff01::fe/64 dev home nodad",
        "addr add 192.0.2.254/24 dev lrouter",
        "link set home up",
        "link set lrouter up",
        f"route add {HOME_LAN_V6} via {HOME_WAN_V6}",
    ],
    "home": [
        f"addr add {HOME_WAN_V4}/24 dev wan",
        f"addr add {HOME_WAN_V6}/64 dev wan nodad",
        "addr add 192.168.77.1/24 dev br0",
        "addr add 2001:db8:1::1/64 dev br0 nodad",
        "link set pi master br0",
        "link set lanhost master br0",
        "link set wan up",
        "link set br0 up",
        "link set pi up",
        "link set lanhost up",
        "route add default via 198.51.100.254",
        "route add default via 2001:db8:ff01::fe",
    ],
    "pi": [
        f"addr add {PI_V4}/24 dev eth0",
        f"addr add {PI_V6}/64 dev eth0 nodad",
        "link set eth0 up",
        "route add default via 192.168.77.1",
        "route add default via 2001:db8:1::1",
    ],
    "lanhost": [
        f"addr add {LANHOST_V4}/24 dev eth0",
        f"addr add {LANHOST_V6}/64 dev eth0 nodad",
        "link set eth0 up",
        "route add default via 192.168.77.1",
        "route add default via 2001:db8:1::1",
    ],
    "lrouter": [
        f"addr add {LAPTOP_ROUTER_WAN_V4}/24 dev wan",
        "addr add 10.77.0.1/24 dev br0",
        "link set laptop master br0",
        "link set wan up",
        "link set br0 up",
        "link set laptop up",
        "route add default via 192.0.2.254",
    ],
    "laptop": [
        f"addr add {LAPTOP_V4}/24 dev eth0",
        "link set eth0 up",
        "route add default via 10.77.0.1",
    ],
}
_LAPTOP2_LINKS = ["link add laptop2 index 106 type veth peer name eth0 netns {laptop2}"]
_LAPTOP2_ADDRS = ["link set laptop2 master br0", "link set laptop2 up"]

_NFT_HOME = f"""
table inet lab_home {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "wan" udp dport {WIREGUARD_PORT} dnat ip to {PI_V4}:{WIREGUARD_PORT}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" ip saddr {HOME_LAN_V4} masquerade
    }}
}}
"""
# postrouting sees both what the router forwards and what it generates itself,
# so one chain hides every "too big" signal, wherever the small MTU is.
_NFT_PMTU_BLACKHOLE = """
table inet lab_pmtu_blackhole {
    chain postrouting {
        type filter hook postrouting priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter drop
        icmpv6 type packet-too-big counter drop
    }
}
"""
_NFT_LROUTER = """
table inet lab_lrouter {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" ip saddr 10.77.0.0/24 masquerade
    }
}
"""


class Lab:
    """The topology above, as a context manager: `with Lab() as lab: lab.laptop.fetch(...)`.

    Teardown always runs (exception, Ctrl-C, failed set-up): background processes
    get SIGTERM, then SIGKILL, the namespaces are deleted, the scratch dir removed
    (unless keep=True)."""

    internet: Host
    home: Host
    pi: Host
    lanhost: Host
    lrouter: Host
    laptop: Host
    laptop2: Host | None

    def __init__(self, *, pmtu_blackhole: bool = False, laptop2: bool = False, keep: bool = False) -> None:
        n = next(_lab_counter)
        self.run_id = str(os.getpid()) if n == 0 else f"{os.getpid()}x{n}"
        self.prefix = f"mp{self.run_id}-"
        self.pmtu_blackhole, self.keep = pmtu_blackhole, keep
        roles = ["inet", "home", "pi", "lanhost", "lrouter", "laptop"]
        if laptop2:
            roles.append("laptop2")
        self.hosts = {role: Host(self, role, self.prefix + role) for role in roles}
        self.internet, self.home, self.pi = self.hosts["inet"], self.hosts["home"], self.hosts["pi"]
        self.lanhost, self.lrouter = self.hosts["lanhost"], self.hosts["lrouter"]
        self.laptop, self.laptop2 = self.hosts["laptop"], self.hosts.get("laptop2")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix=f"meshpi-lab-{self.run_id}-"))
        self._created: list[str] = []

    @property
    def namespaces(self) -> list[str]:
        return [host.ns for host in self.hosts.values()]

    def __enter__(self) -> Lab:
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
        started = time.monotonic()
        names = {role: host.ns for role, host in self.hosts.items()}
        for host in self.hosts.values():
            netns.create(host.ns)
            self._created.append(host.ns)
            # No DAD, not even for link-local addresses: a router whose fe80:: is still
            # tentative holds packets for ~2 s before it can resolve its next hop.
            host.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0",
                      "net.ipv6.conf.default.accept_dad=0"])  # fmt: skip
        links, addrs = dict(_LINKS), dict(_ADDRS)
        if self.laptop2 is not None:
            links["lrouter"] = links["lrouter"] + _LAPTOP2_LINKS
            addrs["lrouter"] = addrs["lrouter"] + _LAPTOP2_ADDRS
            addrs["laptop2"] = [a.replace(LAPTOP_V4, LAPTOP2_V4) for a in addrs["laptop"]]
        for role, lines in links.items():
            self._ip_batch(role, [line.format(**names) for line in lines])
        for role, lines in addrs.items():
            self._ip_batch(role, lines)
        for role, host in self.hosts.items():
            on = "1" if role in ROUTERS else "0"
            # Set explicitly: a new namespace inherits net.ipv4 settings from the host's.
            host.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={on}",
                      f"net.ipv6.conf.all.forwarding={on}"])  # fmt: skip
        self.home.run(["nft", "-f", "-"], input=_NFT_HOME)
        if self.pmtu_blackhole:
            self.home.run(["nft", "-f", "-"], input=_NFT_PMTU_BLACKHOLE)
        self.lrouter.run(["nft", "-f", "-"], input=_NFT_LROUTER)
        logger.info("lab %s up in %.2fs (scratch %s)", self.prefix, time.monotonic() - started,
                 self.scratch)  # fmt: skip

    def _ip_batch(self, role: str, lines: list[str]) -> None:
        self.hosts[role].run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")

    def stop_process(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; returns its exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %gs; killing it", proc.pid, grace)
        # The group may outlive its leader (e.g. a daemonised child): kill it in any case.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        return proc.returncode

    def close(self) -> None:
        """Tear everything down. Idempotent; a second Ctrl-C cannot interrupt it halfway."""
        started = time.monotonic()
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                self.stop_process(proc)
            self.procs.clear()
            for name in reversed(self._created):
                netns.delete(name)  # also SIGKILLs anything still inside
            self._created.clear()
            if self.keep:
                logger.info("lab %s: scratch kept at %s", self.prefix, self.scratch)
            else:
                shutil.rmtree(self.scratch, ignore_errors=True)
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)
        logger.info("lab %s down in %.2fs", self.prefix, time.monotonic() - started)

    def leftovers(self) -> list[str]:
        return netns.leftovers(self.prefix)

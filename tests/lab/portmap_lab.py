"""A small lab of its own for port mapping: a home router running Debian's miniupnpd
(nftables backend) with a WAN address that miniupnpd accepts as public.

miniupnpd refuses to map anything while its WAN address is private or reserved (the
documentation ranges of tests/lab/topology.py included, even with ext_ip=), so this
router's WAN is 5.5.5.0/24: an ordinary public range, which exists here only inside
these namespaces (nothing leaves them: the inet host is the end of the world).

    inet   5.5.5.254/24 on "router"       (the internet: sends to the mapped address)
     |
    [wan] router  5.5.5.1/24              miniupnpd: UPnP-IGD, NAT-PMP, PCP on br0;
          br0 192.168.77.1/24             masquerade for the LAN; NO port forward
          (+ 192.168.77.254/32, a second address the hostile tests answer from)
           +-- pi     192.168.77.2/24 gw .1
           +-- rogue  192.168.77.3/24 gw .1   (another host on the LAN)

With away=True, a laptop behind a NAT of its own (plain masquerade: a hotel, a
phone's hotspot), and inet routes between the two upstreams:

    inet   6.6.6.254/24 on "away"
     |
    [wan] away  6.6.6.1/24                masquerade; nothing forwarded in
          lan   192.168.88.1/24
           +-- laptop 192.168.88.2/24 gw .1

Namespaces are `mp<pid>x<n>-<role>` like the main lab's, so `python -m tests.lab down`
removes leftovers of a crashed run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.lab import netns
from tests.lab.host import Host, LabError, wait_for

logger = logging.getLogger(__name__)

WAN_V4, WAN_NET = "5.5.5.1", "5.5.5.0/24"
INET_V4 = "5.5.5.254"
GATEWAY_V4, GATEWAY_ALT_V4 = "192.168.77.1", "192.168.77.254"
PI_V4, ROGUE_V4 = "192.168.77.2", "192.168.77.3"
LAN = "192.168.77.0/24"
MINIUPNPD = "/usr/sbin/miniupnpd"
AWAY_WAN_V4, AWAY_INET_V4, LAPTOP_V4 = "6.6.6.1", "6.6.6.254", "192.168.88.2"
_counter = itertools.count(500)  # the main lab counts from 0; keep out of its way

_LINKS = {
    "inet": ["link add router index 201 type veth peer name wan netns {router}"],
    "router": [
        "link add br0 type bridge forward_delay 0",
        "link add pi index 202 type veth peer name eth0 netns {pi}",
        "link add rogue index 203 type veth peer name eth0 netns {rogue}",
    ],
}
_ADDRS = {
    "inet": [f"addr add {INET_V4}/24 dev router", "link set router up"],
    "router": [
        f"addr add {WAN_V4}/24 dev wan",
        f"addr add {GATEWAY_V4}/24 dev br0",
        f"addr add {GATEWAY_ALT_V4}/32 dev br0",
        "link set pi master br0",
        "link set rogue master br0",
        "link set wan up",
        "link set br0 up",
        "link set pi up",
        "link set rogue up",
        f"route add default via {INET_V4}",
    ],
    "pi": [f"addr add {PI_V4}/24 dev eth0", "link set eth0 up", f"route add default via {GATEWAY_V4}"],
    "rogue": [f"addr add {ROGUE_V4}/24 dev eth0", "link set eth0 up", f"route add default via {GATEWAY_V4}"],
}

# The tables and chains miniupnpd 2.3's nftables backend writes into (its defaults:
# table inet filter; chains miniupnpd, prerouting_miniupnpd, postrouting_miniupnpd).
# Debian's nft_init.sh would make them but sources a helper the package lacks.
# Forwarding is closed except LAN -> WAN, replies, and what miniupnpd opens.
ROUTER_NFT = f"""
table inet filter {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "br0" oifname "wan" accept
        jump miniupnpd
    }}
    chain miniupnpd {{
    }}
    chain prerouting {{
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
        oifname "wan" ip saddr {LAN} masquerade
    }}
    chain prerouting_miniupnpd {{
    }}
    chain postrouting_miniupnpd {{
    }}
}}
"""
_AWAY_LINKS = {
    "inet": ["link add away index 204 type veth peer name wan netns {away}"],
    "away": ["link add lan index 205 type veth peer name eth0 netns {laptop}"],
}
_AWAY_ADDRS = {
    "inet": [f"addr add {AWAY_INET_V4}/24 dev away", "link set away up"],
    "away": [f"addr add {AWAY_WAN_V4}/24 dev wan", "addr add 192.168.88.1/24 dev lan", "link set wan up",
             "link set lan up", f"route add default via {AWAY_INET_V4}"],
    "laptop": [f"addr add {LAPTOP_V4}/24 dev eth0", "link set eth0 up", "route add default via 192.168.88.1"],
}  # fmt: skip
AWAY_NFT = """
table ip away {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan" masquerade
    }
}
"""
MINIUPNPD_CHAINS = ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd")


class Miniupnpd:
    """miniupnpd in the router namespace, its config, leases and rules in the scratch dir."""

    def __init__(self, lab: PortmapLab, natpmp: bool = True, upnp: bool = True) -> None:
        self.lab, self.host = lab, lab.router
        self.dir = lab.scratch / "miniupnpd"
        self.dir.mkdir(exist_ok=True)
        self.conf, self.leases, self.pidfile = (
            self.dir / "miniupnpd.conf",
            self.dir / "leases",
            self.dir / "pid",
        )
        self.log = self.dir / "miniupnpd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        yes = {True: "yes", False: "no"}
        self.conf.write_text(
            "\n".join([
                "ext_ifname=wan",
                "listening_ip=br0",
                "http_port=0",
                f"enable_natpmp={yes[natpmp]}",  # NAT-PMP and PCP both
                f"enable_upnp={yes[upnp]}",
                "ipv6_disable=yes",
                "secure_mode=yes",
                "min_lifetime=1",  # short leases, so that renewals are seen within a test
                "max_lifetime=86400",
                f"lease_file={self.leases}",
                "uuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b",
                f"allow 1024-65535 {LAN} 1024-65535",
                "deny 0-65535 0.0.0.0/0 0-65535",
            ]) + "\n"
        )  # fmt: skip

    def start(self) -> Miniupnpd:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError("miniupnpd already running")
        start = self.log.stat().st_size if self.log.exists() else 0
        self.proc = self.host.popen(
            [MINIUPNPD, "-f", str(self.conf), "-d", "-P", str(self.pidfile)], log=self.log
        )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"miniupnpd exited: {self.log.read_text()[-800:]}")
            text = self.log.read_text(errors="replace")[start:]
            return "Listening for NAT-PMP/PCP" in text or "HTTP listening on port" in text

        wait_for(ready, 10, "miniupnpd to listen")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.lab.procs.remove(self.proc)
            self.proc = None

    def reboot(self) -> None:
        """What a router power cycle does to it: the daemon and every mapping gone, then back."""
        self.stop()
        for chain in MINIUPNPD_CHAINS:
            self.host.run(["nft", "flush", "chain", "inet", "filter", chain])
        self.leases.unlink(missing_ok=True)
        self.start()

    def lease_lines(self) -> list[str]:
        """miniupnpd's lease list (written as mappings come and go)."""
        try:
            return [line for line in self.leases.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def redirects(self) -> list[str]:
        """The DNAT rules miniupnpd has in the router's nft ruleset now."""
        out = self.host.run(["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"]).stdout
        return [line.strip() for line in out.splitlines() if "dnat" in line]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class PortmapLab:
    """The topology above as a context manager; always torn down."""

    def __init__(self, keep: bool = False, away: bool = False) -> None:
        self.run_id = f"{os.getpid()}x{next(_counter)}"
        self.prefix = f"mp{self.run_id}-"
        self.keep, self.away = keep, away
        roles = ("inet", "router", "pi", "rogue", *(("away", "laptop") if away else ()))
        self.hosts = {role: Host(self, role, self.prefix + role) for role in roles}  # type: ignore[arg-type]
        self.internet, self.router = self.hosts["inet"], self.hosts["router"]
        self.pi, self.rogue = self.hosts["pi"], self.hosts["rogue"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix=f"meshpi-lab-{self.run_id}-"))
        self._created: list[str] = []

    def __enter__(self) -> PortmapLab:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def up(self) -> None:
        names = {role: host.ns for role, host in self.hosts.items()}
        routers = ("router", "away", "inet") if self.away else ("router",)  # inet routes between the two
        for role, host in self.hosts.items():
            netns.create(host.ns)
            self._created.append(host.ns)
            on = "1" if role in routers else "0"
            host.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={on}"])
        links, addrs = [_LINKS], [_ADDRS]
        if self.away:
            links.append(_AWAY_LINKS)
            addrs.append(_AWAY_ADDRS)
        for table in links:
            for role, lines in table.items():
                self.hosts[role].run(
                    ["ip", "-batch", "-"], input="\n".join(ln.format(**names) for ln in lines) + "\n"
                )
        for table in addrs:
            for role, lines in table.items():
                self.hosts[role].run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
        self.router.run(["nft", "-f", "-"], input=ROUTER_NFT)
        if self.away:
            self.hosts["away"].run(["nft", "-f", "-"], input=AWAY_NFT)

    def change_wan_address(self, new: str) -> None:
        """The ISP hands the router a new address (same subnet, same upstream), and the
        old one is gone from the internet: packets to it go nowhere, packets from it are
        dropped at the ISP's edge (a flow the router still holds in conntrack with the
        old address must not keep working, as it would not out there)."""
        old = [WAN_V4]
        self.router.run(["ip", "addr", "del", f"{WAN_V4}/24", "dev", "wan"], check=False)
        for line in self.router.run(["ip", "-4", "-o", "addr", "show", "dev", "wan"]).stdout.splitlines():
            match = re.search(r"inet (\S+)", line)
            if match:
                self.router.run(["ip", "addr", "del", match[1], "dev", "wan"])
                old.append(match[1].split("/")[0])
        self.router.run(["ip", "addr", "add", f"{new}/24", "dev", "wan"])
        self.router.run(["ip", "route", "replace", "default", "via", INET_V4])
        self.internet.run(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1",
                           "net.ipv4.conf.router.rp_filter=1"])  # fmt: skip
        for address in old:
            if address != new:
                self.internet.run(["ip", "route", "replace", "blackhole", f"{address}/32"])
        self.internet.run(["ip", "route", "del", "blackhole", f"{new}/32"], check=False)

    def stop_process(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
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
        if not self.keep:
            shutil.rmtree(self.scratch, ignore_errors=True)

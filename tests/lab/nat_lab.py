"""A lab for path selection: two nodes, each behind a router of its own whose NAT
is one of a few kinds (built with nftables), and meshpi-control (with its relay
and STUN server) on the internet between them.

    inet 5.6.1.254/24 ("ra") and 5.6.2.254/24 ("rb"): meshpi-control :8080, STUN :3478
      |                                  |
    [wan] rtra 5.6.1.1                 [wan] rtrb 5.6.2.1          NAT kind per router
          lan 10.61.0.1/24                   lan 10.62.0.1/24
      |                                  |
    nodea 10.61.0.2 (agent)            nodeb 10.62.0.2 (agent)

NAT kinds (the router's nft table `inet natlab`):
- "cone": endpoint-independent mapping and filtering ("full cone"): masquerade,
  which keeps the source port when it is free, plus a DNAT of that port on the
  WAN to the node, so anyone may send to the mapping once it exists.
Every router drops what comes unsolicited from the WAN to itself (as home routers
do; see nat_ruleset).

- "restricted": plain Linux masquerade: endpoint-independent mapping (the port
  kept), address-and-port-dependent filtering (only conntrack replies come in):
  a "port-restricted cone". Punching works when both sides send.
- "symmetric": `masquerade fully-random`: a new random port per destination, so
  the port STUN saw is not the port a peer is sent from.
- "noudp": masquerade, and the router forwards no UDP from the LAN at all (TCP
  goes: control and its relay work, nothing direct, no STUN).

Namespaces are `mp<pid>x<n>-<role>` (n from 800: the main lab counts from 0, the
port mapping lab from 500), so `python -m tests.lab down` removes leftovers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.lab import netns
from tests.lab.host import Host

KINDS = ("cone", "restricted", "symmetric", "noudp")
INET_A, INET_B = "5.6.1.254", "5.6.2.254"
WAN = {"a": "5.6.1.1", "b": "5.6.2.1"}
LAN_GW = {"a": "10.61.0.1", "b": "10.62.0.1"}
NODE = {"a": "10.61.0.2", "b": "10.62.0.2"}
WG_PORT = 51820
_counter = itertools.count(800)


def nat_ruleset(kind: str, side: str) -> str:
    """The router's NAT of `kind` for its node (see the module doc)."""
    if kind not in KINDS:
        raise ValueError(f"NAT kind {kind!r} is not one of {', '.join(KINDS)}")
    masq = "masquerade fully-random" if kind == "symmetric" else "masquerade"
    pre = ""
    if kind == "cone":
        pre = (
            "chain pre { type nat hook prerouting priority dstnat; policy accept;\n"
            f'  iifname "wan" udp dport {WG_PORT} dnat ip to {NODE[side]}:{WG_PORT}\n}}\n'
        )
    fwd = ""
    if kind == "noudp":
        fwd = (
            "chain forward { type filter hook forward priority filter; policy accept;\n"
            '  iifname "lan" meta l4proto udp counter drop\n}\n'
        )
    # Like any home router: nothing unsolicited from the WAN to the router itself.
    # Dropped here, such a packet leaves no conntrack entry; delivered (answered with
    # port unreachable), its entry would make masquerade pick another port for the
    # node's own packet to that peer a moment later, and no punch would ever work.
    inp = 'chain in { type filter hook input priority filter; policy accept;\n  iifname "wan" ct state new drop\n}\n'
    return (
        "table inet natlab {\n"
        f"{inp}{pre}{fwd}"
        "chain post { type nat hook postrouting priority srcnat; policy accept;\n"
        f'  oifname "wan" ip saddr {NODE[side]} {masq}\n}}\n'
        "}\n"
    )


BLOCK = """table inet natblock {
chain forward { type filter hook forward priority -10; policy accept;
  meta l4proto udp ip saddr { 5.6.1.1, 5.6.2.1 } ip daddr { 5.6.1.1, 5.6.2.1 } counter drop
}
}
"""


class NatLab:
    """The topology above as a context manager; always torn down."""

    def __init__(self, kind_a: str, kind_b: str, keep: bool = False) -> None:
        for kind in (kind_a, kind_b):
            if kind not in KINDS:
                raise ValueError(f"NAT kind {kind!r} is not one of {', '.join(KINDS)}")
        self.kinds = {"a": kind_a, "b": kind_b}
        self.run_id = f"{os.getpid()}x{next(_counter)}"
        self.prefix = f"mp{self.run_id}-"
        self.keep = keep
        roles = ("inet", "rtra", "rtrb", "nodea", "nodeb")
        self.hosts = {role: Host(self, role, self.prefix + role) for role in roles}  # type: ignore[arg-type]
        self.internet = self.hosts["inet"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix=f"meshpi-natlab-{self.run_id}-"))
        self._created: list[str] = []

    def node(self, side: str) -> Host:
        return self.hosts[f"node{side}"]

    def router(self, side: str) -> Host:
        return self.hosts[f"rtr{side}"]

    def __enter__(self) -> NatLab:
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
        for role, host in self.hosts.items():
            netns.create(host.ns)
            self._created.append(host.ns)
            on = "0" if role.startswith("node") else "1"
            host.run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={on}"])
        inet = self.internet
        for side, inet_addr in (("a", INET_A), ("b", INET_B)):
            router, node = self.router(side), self.node(side)
            inet.run(
                ["ip", "link", "add", f"r{side}", "type", "veth", "peer", "name", "wan", "netns", router.ns]
            )
            router.run(["ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", node.ns])
            inet.run(
                ["ip", "-batch", "-"], input=f"addr add {inet_addr}/24 dev r{side}\nlink set r{side} up\n"
            )
            router.run(["ip", "-batch", "-"], input="\n".join([
                f"addr add {WAN[side]}/24 dev wan", f"addr add {LAN_GW[side]}/24 dev lan",
                "link set wan up", "link set lan up", f"route add default via {inet_addr}",
            ]) + "\n")  # fmt: skip
            node.run(["ip", "-batch", "-"], input="\n".join([
                f"addr add {NODE[side]}/24 dev eth0", "link set eth0 up",
                f"route add default via {LAN_GW[side]}",
            ]) + "\n")  # fmt: skip
            router.run(["nft", "-f", "-"], input=nat_ruleset(self.kinds[side], side))

    def block_direct(self) -> None:
        """The internet drops UDP between the two routers (control's TCP still goes)."""
        self.internet.run(["nft", "-f", "-"], input=BLOCK)

    def unblock_direct(self) -> None:
        self.internet.run(["nft", "delete", "table", "inet", "natblock"])

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

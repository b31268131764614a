"""An in-memory twin of the kernel, for tests of everything above the kernel layer.

It keeps the kernel's rules that matter to meshpi (a deleted link takes its
addresses, routes and peers along; a route needs its link) and renders its whole
state as text, for golden tests in the style of Tailscale's TestRouterStates.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from appliance.base.keys import PublicKey
from appliance.base.net import IPInterface
from appliance.core.model import RULE_PRIORITIES, Connected, NftRuleset, Peer, Route, Rule, Scope
from appliance.kernel.base import InterfaceNotFound, KernelError, WgDevice, WgUpdate
from appliance.kernel.sysctl import SysctlNotFound, Sysctls
from appliance.kernel.system import System


def _per_link(ifname: str) -> dict[str, str]:
    # The kernel makes per-interface sysctls with the interface, and drops them with it.
    return {f"net.ipv4.conf.{ifname}.rp_filter": "0", f"net.ipv4.conf.{ifname}.promote_secondaries": "0"}


@dataclass
class _Link:
    mtu: int = 1420
    up: bool = False
    addresses: set[IPInterface] = field(default_factory=set)
    wg: WgDevice | None = None


@dataclass
class FakeKernel:
    links: dict[str, _Link] = field(default_factory=dict)
    routes: set[Route] = field(default_factory=set)
    rules: set[Rule] = field(default_factory=set)
    nft: NftRuleset | None = None
    proc: dict[str, str] = field(default_factory=dict)
    connected: tuple[Connected, ...] = ()
    probes: list[tuple[str, IPv4Address | IPv6Address]] = field(default_factory=list)  # (dev, to)
    # Fast paths (kernel/offload.py): default-route devices, nft flowtables, and the
    # uplinks whose rx-udp-gro-forwarding can change (its value: proc["ethtool.<dev>.…"]).
    uplinks: tuple[str, ...] = ()
    flowtable: bool = False
    udp_gro: tuple[str, ...] = ()

    def render(self) -> str:
        """The whole state, one fact per line, in a stable order."""
        out = []
        for name, link in sorted(self.links.items()):
            kind = "wireguard" if link.wg else "link"
            out.append(f"link {name} {kind} mtu {link.mtu}{' up' if link.up else ''}")
            out += [f"  address {a}" for a in sorted(link.addresses, key=str)]
            if link.wg is not None:
                pub = link.wg.private_key.public_key() if link.wg.private_key else "(none)"
                out.append(f"  wg key {pub} port {link.wg.listen_port} fwmark {link.wg.fwmark:#x}")
                for key, peer in sorted(link.wg.peers.items()):
                    endpoint = f" endpoint {peer.endpoint}" if peer.endpoint else ""
                    keepalive = f" keepalive {peer.persistent_keepalive}" if peer.persistent_keepalive else ""
                    allowed = ",".join(map(str, peer.allowed_ips))
                    out.append(f"  peer {key} allowed {allowed}{endpoint}{keepalive}")
        out += [f"route {r}" for r in sorted(self.routes, key=str)]
        out += [f"rule {r}" for r in sorted(self.rules, key=lambda r: (r.priority, r.family, str(r)))]
        out += [f"sysctl {k} = {v}" for k, v in sorted(self.proc.items())]
        if self.nft is not None:
            out.append(f"nft table inet meshpi {self.nft.digest}")
            out += [f"  {line}" for line in self.nft.text.splitlines()]
        return "\n".join(out) + "\n"

    def link(self, name: str) -> _Link:
        if name not in self.links:
            raise InterfaceNotFound(f"{name}: no such interface")
        return self.links[name]


class FakeWireGuard:
    name = "fake"

    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def create(self, ifname: str) -> None:
        if ifname not in self.k.links:
            self.k.links[ifname] = _Link()
            self.k.proc.update(_per_link(ifname))
        link = self.k.links[ifname]
        if link.wg is None:
            link.wg = WgDevice(None, 0, 0, {})

    def read(self, ifname: str) -> WgDevice | None:
        link = self.k.links.get(ifname)
        return None if link is None else link.wg

    def configure(self, ifname: str, update: WgUpdate) -> None:
        link = self.k.link(ifname)
        if link.wg is None:
            raise KernelError(f"{ifname} is not a WireGuard interface")
        dev = link.wg
        peers: dict[PublicKey, Peer] = dict(dev.peers)
        for key in update.remove:
            peers.pop(key, None)
        for peer in update.upsert:
            old = peers.get(peer.public_key)
            if old is not None and peer.endpoint is None:
                peer = replace(peer, endpoint=old.endpoint)
            peers[peer.public_key] = replace(peer, name="")
        link.wg = WgDevice(
            update.private_key or dev.private_key,
            dev.listen_port if update.listen_port is None else update.listen_port,
            dev.fwmark if update.fwmark is None else update.fwmark,
            peers,
        )


class FakeLinks:
    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def exists(self, ifname: str) -> bool:
        return ifname in self.k.links

    def mtu(self, ifname: str) -> int | None:
        link = self.k.links.get(ifname)
        return None if link is None else link.mtu

    def set_mtu_up(self, ifname: str, mtu: int) -> None:
        link = self.k.link(ifname)
        link.mtu, link.up = mtu, True

    def delete_link(self, ifname: str) -> None:
        if self.k.links.pop(ifname, None) is not None:
            self.k.routes = {r for r in self.k.routes if r.dev != ifname}
            for key in _per_link(ifname):
                self.k.proc.pop(key, None)

    def addresses(self, ifname: str) -> frozenset[IPInterface]:
        link = self.k.links.get(ifname)
        return frozenset() if link is None else frozenset(link.addresses)

    def add_address(self, ifname: str, address: IPInterface) -> None:
        self.k.link(ifname).addresses.add(address)

    def remove_address(self, ifname: str, address: IPInterface) -> None:
        if ifname in self.k.links:
            self.k.links[ifname].addresses.discard(address)

    def routes(self, scope: Scope) -> frozenset[Route]:
        return frozenset(r for r in self.k.routes if r.dev == scope.interface or r.table == scope.table)

    def add_route(self, route: Route) -> None:
        self.k.link(route.dev)
        self.k.routes.add(route)

    def remove_route(self, route: Route) -> None:
        self.k.routes.discard(route)

    def rules(self, scope: Scope) -> frozenset[Rule]:
        return frozenset(r for r in self.k.rules if r.priority in RULE_PRIORITIES)

    def add_rule(self, rule: Rule) -> None:
        self.k.rules.add(rule)

    def remove_rule(self, rule: Rule) -> None:
        self.k.rules.discard(rule)

    def connected(self, exclude: str) -> tuple[Connected, ...]:
        return tuple(c for c in self.k.connected if c.dev != exclude)

    def probe(self, ifname: str, address: IPv4Address | IPv6Address) -> None:
        self.k.probes.append((ifname, address))


class FakeFirewall:
    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def digest(self) -> str | None:
        return None if self.k.nft is None else self.k.nft.digest

    def replace(self, ruleset: NftRuleset) -> None:
        self.k.nft = ruleset

    def delete(self) -> None:
        self.k.nft = None


class FakeProcSys:
    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def read(self, key: str) -> str:
        if key not in self.k.proc:
            raise SysctlNotFound(f"sysctl {key}: no such key")
        return self.k.proc[key]

    def write(self, key: str, value: str) -> None:
        self.k.proc[key] = value


class FakeOffloads:
    def __init__(self, kernel: FakeKernel) -> None:
        self.k = kernel

    def flowtable(self) -> bool:
        return self.k.flowtable

    def uplinks(self, exclude: str) -> tuple[str, ...]:
        return tuple(d for d in self.k.uplinks if d != exclude)

    def udp_gro_capable(self, ifname: str) -> bool:
        return ifname in self.k.udp_gro


def fake_system(state_dir: Path, kernel: FakeKernel | None = None) -> tuple[System, FakeKernel]:
    """A System over an in-memory kernel; sysctl originals persist in state_dir."""
    k = kernel or FakeKernel()
    k.proc.setdefault("net.ipv4.ip_forward", "0")
    k.proc.setdefault("net.ipv6.conf.all.forwarding", "0")
    k.proc.setdefault("net.ipv4.conf.all.src_valid_mark", "0")
    system = System(
        FakeWireGuard(k),
        FakeLinks(k),
        FakeFirewall(k),
        Sysctls(FakeProcSys(k), state_dir / "sysctl-originals.json"),
        FakeOffloads(k),
    )
    return system, k

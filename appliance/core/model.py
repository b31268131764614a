"""What the kernel should hold, and what it holds: one vocabulary for both.

`State` is produced twice: by the planner from a netmap and prefs (desired), and
by the kernel layer from the live system (current). `diff(current, desired)`
compares the two, so every field here is something the kernel can report back.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Network,
    IPv6Network,
)
from types import MappingProxyType

from immutables import Map

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint, IPAddress, IPInterface, IPNetwork

MAIN_TABLE = 254


def _net_key(net: IPNetwork) -> tuple[int, int, int]:
    return (net.version, int(net.network_address), net.prefixlen)


def sorted_networks(nets: object) -> tuple[IPNetwork, ...]:
    """Networks in a canonical order (v4 before v6, by address, then length)."""
    return tuple(sorted(set(nets), key=_net_key))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Scope:
    """The kernel objects meshpi owns. Everything outside it is left alone."""

    interface: str
    table: int
    fwmark: int


@dataclass(frozen=True)
class Device:
    """The WireGuard interface itself."""

    name: str
    private_key: PrivateKey | None  # None: a device the kernel has, with no key set yet
    listen_port: int
    fwmark: int
    mtu: int


@dataclass(frozen=True)
class Peer:
    public_key: PublicKey
    allowed_ips: tuple[IPNetwork, ...]  # canonical order, see sorted_networks
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0
    # For log lines only: the kernel does not know peer names.
    name: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.public_key.short})" if self.name else self.public_key.short


@dataclass(frozen=True)
class HostedDevice:
    """A stock WireGuard client (a phone) this node hosts: a peer of this node only;
    the rest of the mesh reaches its addresses through this node."""

    name: str
    public_key: PublicKey
    addresses: tuple[IPAddress, ...]

    @property
    def prefixes(self) -> tuple[IPNetwork, ...]:
        return tuple(
            IPv4Network((int(a), 32)) if a.version == 4 else IPv6Network((int(a), 128))
            for a in self.addresses
        )


@dataclass(frozen=True, order=True)
class Route:
    """A unicast route through the mesh interface, in `table`."""

    dst: IPNetwork
    dev: str
    table: int = MAIN_TABLE

    def __str__(self) -> str:
        table = "" if self.table == MAIN_TABLE else f" table {self.table}"
        return f"{self.dst} dev {self.dev}{table}"


@dataclass(frozen=True)
class Rule:
    """A policy routing rule, as `ip rule` shows it."""

    priority: int
    family: int  # 4 or 6
    table: int
    fwmark: int = 0  # matched with a full mask; 0 means no fwmark match
    invert: bool = False
    dst: IPNetwork | None = None
    suppress_prefixlength: int | None = None

    def __str__(self) -> str:
        parts = [f"{self.priority}:", "-6" if self.family == 6 else "-4"]
        if self.invert:
            parts.append("not")
        if self.fwmark:
            parts.append(f"fwmark {self.fwmark:#x}")
        if self.dst is not None:
            parts.append(f"to {self.dst}")
        parts.append("lookup " + ("main" if self.table == MAIN_TABLE else str(self.table)))
        if self.suppress_prefixlength is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        return " ".join(parts)


@dataclass(frozen=True)
class NftRuleset:
    """The whole of table `inet meshpi`. Compared by digest: the kernel stores the
    digest as the table's comment, so the live table can be checked cheaply."""

    digest: str
    text: str = field(default="", compare=False, repr=False)

    @classmethod
    def from_text(cls, text: str) -> NftRuleset:
        return cls(hashlib.sha256(text.encode()).hexdigest()[:16], text)


def _frozen(mapping: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted((mapping or {}).items())))


@dataclass(frozen=True)
class State:
    device: Device | None = None
    peers: Mapping[PublicKey, Peer] = field(default_factory=dict)
    addresses: frozenset[IPInterface] = frozenset()
    routes: frozenset[Route] = frozenset()
    rules: frozenset[Rule] = frozenset()
    # Only sysctls meshpi manages: key (dotted, e.g. net.ipv4.ip_forward) -> value.
    sysctls: Mapping[str, str] = field(default_factory=dict)
    nft: NftRuleset | None = None
    # Planned from a previous State (weakly) by changing only these peers: diff()
    # then compares those peers only (planner.PeerMemo). Not part of equality.
    derived: tuple[weakref.ref[State], frozenset[PublicKey]] | None = field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "sysctls", _frozen(self.sysctls))
        # A persistent map (immutable; the planner shares it between plans) as is.
        if not isinstance(self.peers, Map):
            object.__setattr__(self, "peers", Map(self.peers))

    def changed_peers_since(self, other: State) -> frozenset[PublicKey] | None:
        """The peers that may differ from `other`, if this State was planned from
        it; None when unknown (compare them all)."""
        if self.derived is not None and self.derived[0]() is other:
            return self.derived[1]
        return None

    @property
    def empty(self) -> bool:
        return self == State()


@dataclass(frozen=True)
class Connected:
    """A prefix directly connected on a non-mesh interface (uplink or LAN)."""

    dev: str
    network: IPNetwork


@dataclass(frozen=True)
class HostFacts:
    """What the planner needs to know about the machine, read by the kernel layer."""

    connected: tuple[Connected, ...] = ()
    # Was IP forwarding on before meshpi touched it? Then this host already routes
    # for someone else, and meshpi must not start dropping that traffic.
    forwarding_preexisting: bool = False
    # Interfaces holding a default route (the WAN side of an exit node).
    uplinks: tuple[str, ...] = ()
    # Does this kernel have nft flowtables (nf_flow_table)? Debian's arm64 kernel does.
    flowtable: bool = False
    # Uplinks whose driver lets rx-udp-gro-forwarding be changed.
    udp_gro: tuple[str, ...] = ()


# Policy routing rules meshpi owns are the ones with a priority in this range,
# the way Tailscale owns 5210-5270. Reading the kernel, anything here is ours.
RULE_PRIORITIES = range(5200, 5300)

"""The network map: this node and its peers, as control (or a static file) states it.

A netmap never carries a private key: keys are made on the device and stay there.
Who holds each key, name and address (the index deltas carry forward) is netmap_index.py.

Capability versions (CAPVER). Every map answer says which version it is written
in and which fields a reader may ignore (`"capver"`, `"optional"`); control
writes to each agent in the version that agent sent (protocol v1, `map`), so an
older agent never sees a field it does not know, and a newer agent reading an
older map finds every field it needs (new fields are optional by rule).
  1  the first netmap (no capver field: a map without one is version 1)
  2  `capver` and `optional` themselves; `endpoints` per node: every candidate
     endpoint (local, mapped, reflexive), best first; `endpoint` stays the first
  3  DNS (wire/dnsname.py): top-level `dns` (the mesh domain; in deltas too), and per
     node `dns_name` (its label), `devices` (the label and addresses of each device
     it hosts) and `lan_dns` (split DNS: its LAN's domains and resolver)
  4  no new field: the agent reads a compressed sealed answer (wire/mapzip.py), which
     control sends for a full map; the JSON inside is the same
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, overload

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress, IPNetwork
from appliance.wire.dnsname import (
    DnsConfig,
    LanDns,
    NamedDevice,
    parse_dns_config,
    parse_label,
    parse_lan_dns,
    parse_named_device,
)
from appliance.wire.fields import (
    Fields,
    int_range,
    load_json,
    parse_address,
    parse_endpoint,
    parse_name,
    parse_network,
    parse_public_key,
)
from appliance.wire.netmap_index import Index

CAPVER = 4
# The fields each version added: what a reader of an older version must not be sent.
ADDED_IN: dict[str, int] = {"endpoints": 2, "dns": 3, "dns_name": 3, "devices": 3, "lan_dns": 3}
EXIT_ROUTES: tuple[IPNetwork, ...] = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))
MAX_ENDPOINTS = 16
MAX_DEVICES = 64  # hosted by one node (control's cap)

# How often a whole netmap was parsed or rendered: the in-memory path from
# control to the kernel does neither for a delta (scripts/bench/apply shows it).
codec_counts: Counter[str] = Counter()


@dataclass(frozen=True)
class Mesh:
    ipv4: IPv4Network
    ipv6: IPv6Network


@dataclass(frozen=True)
class Node:
    name: str
    public_key: PublicKey
    addresses: tuple[IPAddress, ...]
    endpoint: Endpoint | None = None  # the best candidate, what WireGuard is given
    routes: tuple[IPNetwork, ...] = ()  # approved routes: exit (0/0, ::/0) and subnets
    endpoints: tuple[Endpoint, ...] = ()  # every candidate, best first (capver 2)
    dns_name: str | None = None  # its DNS label under the mesh domain (capver 3)
    devices: tuple[NamedDevice, ...] = ()  # the devices it hosts, by DNS label (capver 3)
    lan_dns: LanDns | None = None  # split DNS for its subnet routes (capver 3)

    def __post_init__(self) -> None:
        # Nodes are looked up by value on every re-plan: hash once, not per lookup.
        fields = (self.name, self.public_key, self.addresses, self.endpoint, self.routes, self.endpoints,
                  self.dns_name, self.devices, self.lan_dns)  # fmt: skip
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    @property
    def is_exit_node(self) -> bool:
        return any(r in EXIT_ROUTES for r in self.routes)

    @property
    def subnet_routes(self) -> tuple[IPNetwork, ...]:
        return tuple(r for r in self.routes if r not in EXIT_ROUTES)


class PeerList(Sequence[Node]):
    """A delta-made netmap's peers: the tuple is made when first read, not per
    delta (a one-peer change must not cost O(mesh)). Equal to a tuple of the same."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self._nodes: tuple[Node, ...] | None = None

    def _all(self) -> tuple[Node, ...]:
        if self._nodes is None:
            self._nodes = self._index.ordered_peers()
        return self._nodes

    def __len__(self) -> int:
        return len(self._index.peers)

    @overload
    def __getitem__(self, i: int) -> Node: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Node, ...]: ...
    def __getitem__(self, i: int | slice) -> Node | tuple[Node, ...]:
        return self._all()[i]

    def __iter__(self) -> Iterator[Node]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PeerList, tuple)):
            return self._all() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


@dataclass(frozen=True)
class Netmap:
    mesh: Mesh
    self_node: Node
    peers: Sequence[Node]  # a tuple, or a PeerList (made from an Index, for a delta)
    index: Index | None = field(default=None, compare=False, repr=False)
    # Made from another netmap by a delta: (that netmap, weakly; the peer keys the
    # delta touched). The planner then re-plans those peers only. Weak, so a
    # long run of deltas does not keep every old netmap alive.
    origin: tuple[weakref.ref[Netmap], frozenset[PublicKey]] | None = field(
        default=None, compare=False, repr=False
    )
    dns: DnsConfig | None = None  # None: a control from before names (capver < 3)

    def __post_init__(self) -> None:
        if self.index is None:
            object.__setattr__(self, "index", Index.build("netmap", self.self_node, tuple(self.peers)))

    def touched_since(self, other: Netmap) -> frozenset[PublicKey] | None:
        """The peer keys a delta changed or removed, if this netmap was made from
        `other` by one; None when unknown (any peer may differ)."""
        if self.origin is not None and self.origin[0]() is other:
            return self.origin[1]
        return None

    def removed_since(self, other: Netmap) -> bool:
        """May a peer of `other` be gone here (removed, or rotated to a new key)?"""
        touched = self.touched_since(other)
        assert self.index is not None
        return touched is None or any(k not in self.index.peers for k in touched)

    def find_peer(self, name_or_ip: str) -> Node | None:
        assert self.index is not None
        key = self.index.owner_of.get(("name", name_or_ip))
        if key is None:
            try:
                key = self.index.owner_of.get(parse_address(name_or_ip))
            except ValueError:
                return None
        return None if key is None else self.index.peers.get(key)


def _parse_v4(value: object) -> IPv4Network:
    net = parse_network(value)
    if not isinstance(net, IPv4Network):
        raise ValueError("must be an IPv4 network")
    return net


def _parse_v6(value: object) -> IPv6Network:
    net = parse_network(value)
    if not isinstance(net, IPv6Network):
        raise ValueError("must be an IPv6 network")
    return net


def _parse_optional_endpoint(value: object) -> Endpoint | None:
    return None if value is None else parse_endpoint(value)


def parse_node(
    source: str, path: str, obj: object, mesh: Mesh, optional: frozenset[str] = frozenset()
) -> Node:
    f = Fields(source, path, obj, optional)
    name = f.require("name", parse_name)
    key = f.require("public_key", parse_public_key)
    addresses = f.get_list("addresses", parse_address)
    if not addresses:
        raise f.error("addresses", f.obj.get("addresses"), "must hold at least one address")
    for i, addr in enumerate(addresses):
        rng = mesh.ipv4 if addr.version == 4 else mesh.ipv6
        if addr not in rng:
            raise f.error(f"addresses[{i}]", str(addr), f"is outside the mesh range {rng}")
    endpoint = f.get("endpoint", _parse_optional_endpoint, None)
    routes = f.get_list("routes", parse_network)
    endpoints = f.get_list("endpoints", parse_endpoint)
    if len(endpoints) > MAX_ENDPOINTS:
        raise f.error("endpoints", len(endpoints), f"is more candidates than {MAX_ENDPOINTS}")
    dns_name = f.get("dns_name", _optional_label, None)
    raw_devices = f.get("devices", _any, None) or []
    if not isinstance(raw_devices, list) or len(raw_devices) > MAX_DEVICES:
        raise f.error("devices", raw_devices, f"must be a list of at most {MAX_DEVICES} devices")
    devices = tuple(
        parse_named_device(Fields(source, f.where(f"devices[{i}]"), d)) for i, d in enumerate(raw_devices)
    )
    lan_dns = None if f.obj.get("lan_dns") is None else parse_lan_dns(f.sub("lan_dns"))
    f.get("lan_dns", _any, None)
    f.done(_UPGRADE)
    return Node(name, key, addresses, endpoint, routes, endpoints, dns_name, devices, lan_dns)


def _optional_label(value: object) -> str | None:
    return None if value is None else parse_label(value)


def parse_dns(top: Fields) -> DnsConfig | None:
    """The top-level `dns` of a map or delta (capver 3), if there is one."""
    top.get("dns", _any, None)
    return None if top.obj.get("dns") is None else parse_dns_config(top.sub("dns"))


_UPGRADE = f"; this agent reads netmaps up to capability version {CAPVER}: upgrade meshpi"


def _any(value: object) -> object:
    return value


def _optional_names(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of field names")
    return frozenset(value)


def read_version(top: Fields) -> frozenset[str]:
    """The `capver` and `optional` of a map answer; returns the optional names."""
    top.get("capver", int_range(1, 1 << 30), 1)
    return top.get("optional", _optional_names, frozenset())


def parse_netmap(obj: object, source: str = "netmap") -> Netmap:
    codec_counts["full_parse"] += 1
    top = Fields(source, "", obj)
    optional = top.optional = read_version(top)
    m = top.sub("mesh")
    mesh = Mesh(m.require("ipv4", _parse_v4), m.require("ipv6", _parse_v6))
    m.done(_UPGRADE)
    self_node = parse_node(source, "self", top.require("self", _any), mesh, optional)
    raw_peers = top.get("peers", _any, None) or []
    if not isinstance(raw_peers, list):
        raise top.error("peers", raw_peers, "must be a list")
    peers = tuple(parse_node(source, f"peers[{i}]", p, mesh, optional) for i, p in enumerate(raw_peers))
    dns = parse_dns(top)
    top.done(_UPGRADE)
    return Netmap(mesh, self_node, peers, Index.build(source, self_node, peers), dns=dns)


def load_netmap(path: Path) -> Netmap:
    return parse_netmap(load_json(path), str(path))


# -- rendering, in the version the reader understands --------------------------------


def version_fields(capver: int) -> dict[str, Any]:
    """The top-level fields that say which version a map answer is written in."""
    if capver < 2:
        return {}
    return {"capver": min(capver, CAPVER), "optional": sorted(f for f, v in ADDED_IN.items() if v > 1)}


def node_json(node: Node, capver: int = CAPVER) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": node.name,
        "public_key": str(node.public_key),
        "addresses": [str(a) for a in node.addresses],
        "endpoint": None if node.endpoint is None else str(node.endpoint),
        "routes": [str(r) for r in node.routes],
    }
    if capver >= ADDED_IN["endpoints"]:
        out["endpoints"] = [str(e) for e in node.endpoints]
    if capver >= ADDED_IN["dns_name"]:
        out["dns_name"] = node.dns_name
        out["devices"] = [d.to_json() for d in node.devices]
        out["lan_dns"] = None if node.lan_dns is None else node.lan_dns.to_json()
    return out


def dns_json(dns: DnsConfig | None, capver: int = CAPVER) -> dict[str, Any]:
    """The top-level `dns` field, for a reader that knows it."""
    return {"dns": dns.to_json()} if dns is not None and capver >= ADDED_IN["dns"] else {}


def netmap_json(netmap: Netmap, capver: int = CAPVER) -> dict[str, Any]:
    codec_counts["full_render"] += 1
    return {
        **version_fields(capver),
        "mesh": {"ipv4": str(netmap.mesh.ipv4), "ipv6": str(netmap.mesh.ipv6)},
        "self": node_json(netmap.self_node, capver),
        "peers": [node_json(p, capver) for p in netmap.peers],
        **dns_json(netmap.dns, capver),
    }

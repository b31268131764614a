"""The network map: this node and its peers, as control (or a static file) states it.

Schema v1. A netmap never carries a private key: keys are made on the device
and stay there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress, IPNetwork
from appliance.wire.fields import (
    ConfigError,
    Fields,
    load_json,
    parse_address,
    parse_endpoint,
    parse_name,
    parse_network,
    parse_public_key,
)

EXIT_ROUTES: tuple[IPNetwork, ...] = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))


@dataclass(frozen=True)
class Mesh:
    ipv4: IPv4Network
    ipv6: IPv6Network


@dataclass(frozen=True)
class Node:
    name: str
    public_key: PublicKey
    addresses: tuple[IPAddress, ...]
    endpoint: Endpoint | None = None
    routes: tuple[IPNetwork, ...] = ()  # approved routes: exit (0/0, ::/0) and subnets

    def __post_init__(self) -> None:
        # Nodes are looked up by value on every re-plan: hash once, not per lookup.
        fields = (self.name, self.public_key, self.addresses, self.endpoint, self.routes)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    @property
    def is_exit_node(self) -> bool:
        return any(r in EXIT_ROUTES for r in self.routes)

    @property
    def subnet_routes(self) -> tuple[IPNetwork, ...]:
        return tuple(r for r in self.routes if r not in EXIT_ROUTES)


@dataclass(frozen=True)
class Netmap:
    mesh: Mesh
    self_node: Node
    peers: tuple[Node, ...]

    def find_peer(self, name_or_ip: str) -> Node | None:
        for peer in self.peers:
            if peer.name == name_or_ip or name_or_ip in map(str, peer.addresses):
                return peer
        return None


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


def _parse_node(source: str, path: str, obj: object, mesh: Mesh) -> Node:
    f = Fields(source, path, obj)
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
    f.done()
    return Node(name, key, addresses, endpoint, routes)


def _any(value: object) -> object:
    return value


class _NodeCache:
    """Parsed nodes by their exact JSON text, so re-reading a netmap in which one
    peer changed costs one peer's parse, not a thousand. Only valid nodes enter;
    a new mesh range starts afresh (addresses are checked against it)."""

    def __init__(self, size: int = 16384) -> None:
        self.size = size
        self.mesh: Mesh | None = None
        self.nodes: dict[str, Node] = {}

    def parser(self, source: str, mesh: Mesh) -> Callable[[str, object], Node]:
        if mesh != self.mesh or len(self.nodes) >= self.size:
            self.mesh, self.nodes = mesh, {}
        nodes = self.nodes

        def parse(path: str, obj: object) -> Node:
            key = repr(obj)
            node = nodes.get(key)
            if node is None:
                node = nodes[key] = _parse_node(source, path, obj, mesh)
            return node

        return parse


_cache = _NodeCache()


def parse_netmap(obj: object, source: str = "netmap") -> Netmap:
    top = Fields(source, "", obj)
    m = top.sub("mesh")
    mesh = Mesh(m.require("ipv4", _parse_v4), m.require("ipv6", _parse_v6))
    m.done()
    parse_node = _cache.parser(source, mesh)
    self_node = parse_node("self", top.require("self", _any))
    raw_peers = top.get("peers", _any, None) or []
    if not isinstance(raw_peers, list):
        raise top.error("peers", raw_peers, "must be a list")
    peers = tuple(parse_node(f"peers[{i}]", p) for i, p in enumerate(raw_peers))
    top.done()
    netmap = Netmap(mesh, self_node, peers)
    _check_unique(source, netmap)
    return netmap


def _check_unique(source: str, netmap: Netmap) -> None:
    """Two nodes with one name, key or address would make routing ambiguous."""
    everyone = (netmap.self_node, *netmap.peers)
    names = {n.name for n in everyone}
    keys = {n.public_key.raw for n in everyone}
    addresses = {(a.version, int(a)) for n in everyone for a in n.addresses}
    if len(names) == len(keys) == len(everyone) and len(addresses) == sum(len(n.addresses) for n in everyone):
        return  # the common case, checked with C-speed sets; below finds the culprit
    seen: dict[object, str] = {}
    nodes = [("self", netmap.self_node)] + [(f"peers[{i}]", p) for i, p in enumerate(netmap.peers)]
    for path, node in nodes:
        facts: list[tuple[str, object]] = [("name", node.name), ("public_key", node.public_key)]
        facts += [(f"addresses[{i}]", a) for i, a in enumerate(node.addresses)]
        for field, value in facts:
            if value in seen:
                shown = str(value)
                raise ConfigError(source, f"{path}.{field}", shown, f"is already used by {seen[value]}")
            seen[value] = path


def load_netmap(path: Path) -> Netmap:
    return parse_netmap(load_json(path), str(path))

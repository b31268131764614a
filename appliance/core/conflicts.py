"""Peers' subnet routes that collide with this host's own networks or the mesh. Pure.

Home, café and office LANs share a handful of prefixes (192.168.1.0/24, 10.0.0.0/24
…). A peer's approved route over one of them must not take the mesh down: the
local network wins for that prefix, the one route is set aside (named, with its
reason, for `meshpi status`), and everything else is planned.

What counts as a conflict, for a peer's route R and a network N of this host
(a prefix connected on a non-mesh interface):

- R equal to N, or R inside N: every address of R is on the local network, so
  the route could never carry anything without cutting the host off its LAN.
  R is set aside (not routed, not in the peer's allowed IPs).
- R containing N (the office's 10.0.0.0/8 while the café is 10.0.0.0/24): the
  route is kept. The local network still wins for its part, because the kernel
  consults `main` (with its connected routes) before meshpi's table (rule
  `suppress_prefixlength 0`); the rest of R stays reachable through the peer.
  Reported as narrowed, not set aside.
- The exit routes (0.0.0.0/0, ::/0) contain every network and never conflict:
  they are the point of an exit node, and the same rule order keeps the LAN local.
- R overlapping the mesh's own ranges without lying inside them (100.0.0.0/8
  over the mesh's 100.64.0.0/10) would claim other peers' addresses: set aside.
  Routes inside the mesh ranges are devices the peer hosts, and are kept.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.base.net import IPAddress, IPNetwork
from appliance.core.model import Connected
from appliance.wire.netmap import EXIT_ROUTES, Mesh, Node


class Conflict(enum.Enum):
    EQUALS_LOCAL = "equals a network of this host"
    INSIDE_LOCAL = "lies inside a network of this host"
    CONTAINS_LOCAL = "contains a network of this host"
    OVERLAPS_MESH = "overlaps the mesh's own range"
    # Inside the mesh only hosted devices' addresses are routed (a host route each):
    # anything else would take other nodes' addresses on every peer.
    MESH_NOT_HOST = "is a mesh network, not one hosted device's address"
    TAKES_NODE = "is another node's mesh address"


@dataclass(frozen=True)
class RouteConflict:
    """One peer's route that collides with `network` (on `dev`, or the mesh's range)."""

    route: IPNetwork
    peer: str  # the peer's name
    kind: Conflict
    network: IPNetwork  # the host's network (or the mesh range) it collides with
    dev: str = ""  # the host's interface holding `network`; "" for the mesh range

    @property
    def in_mesh(self) -> bool:
        """About a route inside the mesh (a hosted device's): taken even without accept_routes."""
        return self.kind in (Conflict.MESH_NOT_HOST, Conflict.TAKES_NODE)

    @property
    def set_aside(self) -> bool:
        """False: the route is kept, and the local network wins only for its own part."""
        return self.kind is not Conflict.CONTAINS_LOCAL

    def __str__(self) -> str:
        where = f"{self.network} on this host's {self.dev}" if self.dev else f"the mesh range {self.network}"
        if not self.set_aside:
            return f"route {self.route} from {self.peer}: {where} stays local, the rest goes to {self.peer}"
        return f"route {self.route} from {self.peer} set aside: it {_verb(self.kind)} {where}"


def _verb(kind: Conflict) -> str:
    return {
        Conflict.EQUALS_LOCAL: "equals",
        Conflict.INSIDE_LOCAL: "lies inside",
        Conflict.CONTAINS_LOCAL: "contains",
        Conflict.OVERLAPS_MESH: "overlaps",
        Conflict.MESH_NOT_HOST: "is a network inside",
        Conflict.TAKES_NODE: "takes another node's address in",
    }[kind]


def in_mesh(net: IPNetwork, mesh: Mesh) -> bool:
    return net.subnet_of(mesh.ipv4) if net.version == 4 else net.subnet_of(mesh.ipv6)


def classify(route: IPNetwork, network: IPNetwork) -> Conflict | None:
    if route.version != network.version or not route.overlaps(network):
        return None
    if route == network:
        return Conflict.EQUALS_LOCAL
    if route.subnet_of(network):  # type: ignore[arg-type]
        return Conflict.INSIDE_LOCAL
    return Conflict.CONTAINS_LOCAL


def route_conflicts(
    peers: Iterable[Node],
    mesh: Mesh,
    connected: Iterable[Connected],
    holder: Callable[[IPAddress], object | None] = lambda _a: None,
) -> tuple[RouteConflict, ...]:
    """Every conflict of every peer's approved subnet route, in netmap order.
    `holder(address)`: which node holds a mesh address, if any (the netmap's index)."""
    local = tuple(connected)
    found: list[RouteConflict] = []
    for peer in peers:
        for route in peer.routes:
            if route in EXIT_ROUTES:
                continue
            if in_mesh(route, mesh):
                mesh_range = mesh.ipv4 if route.version == 4 else mesh.ipv6
                if route.prefixlen != route.max_prefixlen:
                    found.append(RouteConflict(route, peer.name, Conflict.MESH_NOT_HOST, mesh_range))
                elif holder(route.network_address) is not None:
                    found.append(RouteConflict(route, peer.name, Conflict.TAKES_NODE, mesh_range))
                continue
            mesh_range = mesh.ipv4 if route.version == 4 else mesh.ipv6
            if route.overlaps(mesh_range):
                found.append(RouteConflict(route, peer.name, Conflict.OVERLAPS_MESH, mesh_range))
                continue
            for c in local:
                kind = classify(route, c.network)
                if kind is not None:
                    found.append(RouteConflict(route, peer.name, kind, c.network, c.dev))
    return tuple(found)

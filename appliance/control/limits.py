"""What an internet caller may make control keep, and the checks that hold it there.

The node API is reachable by anyone who knows control's public key (it is in the
login URL), so every thing a request can make control store has a cap, and a
request beyond it is refused with a message that names the field and the count:

- routes and endpoints per node (`update`): a node has a few of each; 64 is far
  beyond any home network and keeps a node's row, and every map, small;
- registrations waiting for approval: per source (an IPv4 address, an IPv6 /64,
  since one host owns a whole /64) and in all. A node with a pre-auth key never
  waits, so a flood of anonymous registrations cannot keep a real node out;
  pending registrations that nobody approved are forgotten after PENDING_TTL.

Pure: no I/O, imports wire and base only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from appliance.base.net import IPNetwork
from appliance.wire.netmap import Mesh

MAX_ROUTES = 64
MAX_ENDPOINTS = 64
PENDING_PER_SOURCE = 8
PENDING_TOTAL = 256
PENDING_TTL = timedelta(days=1)


class LimitError(ValueError):
    """A request over a cap, or a route control refuses; the message is safe to send."""


def check_count(field: str, items: Sequence[object], cap: int) -> None:
    if len(items) > cap:
        raise LimitError(f"request: body.{field}: {len(items)} entries, at most {cap}")


def check_routes(mesh: Mesh, routes: Sequence[IPNetwork]) -> None:
    """Refuse an advertised route inside the mesh's own ranges: a peer given it in its
    AllowedIPs would take another node's address. A route that *contains* a mesh
    range (the exit routes 0.0.0.0/0 and ::/0, a 100.0.0.0/8) is fine: each node's
    /32 and /128 are more specific, so they still win."""
    for route in routes:
        ranges: tuple[IPNetwork, ...] = (mesh.ipv4,) if isinstance(route, IPv4Network) else (mesh.ipv6,)
        for mesh_range in ranges:
            if route.overlaps(mesh_range) and not _strictly_contains(route, mesh_range):
                raise LimitError(
                    f"request: body.advertise_routes: {route} overlaps the mesh's own range {mesh_range}"
                )


def _strictly_contains(route: IPNetwork, mesh_range: IPNetwork) -> bool:
    if isinstance(route, IPv4Network) and isinstance(mesh_range, IPv4Network):
        return route.prefixlen < mesh_range.prefixlen and mesh_range.subnet_of(route)
    if isinstance(route, IPv6Network) and isinstance(mesh_range, IPv6Network):
        return route.prefixlen < mesh_range.prefixlen and mesh_range.subnet_of(route)
    return False


def source_key(remote: str | None) -> str | None:
    """Who a registration counts against: the IPv4 address, or the IPv6 /64."""
    if not remote:
        return None
    try:
        address = ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote[:64]  # a unix socket peer, say: counted as itself
    if address.version == 6:
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            return str(mapped)
        return str(ip_network(f"{address}/64", strict=False))
    return str(address)

"""What the node's resolver serves, and where it sends the rest. Pure.

From the netmap (names from control, capver 3), the prefs (the chosen exit node,
accept_routes) and the host's own resolvers (as they were before meshpi touched the
system: an input, never read here):

- the zone: `<label>.<domain>` of this node, every peer and every device any node
  hosts, with both mesh addresses;
- where other names go:
  * no exit node chosen: the host's resolvers (so does an exit node itself: it is
    the one that resolves for the others, from the home's upstream);
  * an exit node in use: that node's resolver, at its mesh addresses through the
    tunnel, and nothing else: the local network's resolver never sees a query;
  * the chosen exit node gone (removed, not offering, unapproved): nowhere. The
    resolver answers SERVFAIL, as the traffic itself is blocked (fail closed);
- split DNS: the domains a subnet router offers for a route this node accepts go
  to that router's LAN resolver, reached over the mesh.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from appliance.base.net import Endpoint, IPAddress
from appliance.core.planner import exit_node_unavailable
from appliance.core.prefs import Prefs
from appliance.wire.fields import parse_address
from appliance.wire.netmap import Netmap, Node

DNS_PORT = 53


@dataclass(frozen=True)
class DnsPlan:
    domain: str
    binds: tuple[Endpoint, ...]  # this node's mesh addresses, port 53
    records: Mapping[str, tuple[IPAddress, ...]]  # fqdn -> addresses, in netmap order
    default: tuple[Endpoint, ...]  # () fails closed
    split: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    via: str = "host"  # where `default` comes from: "host", "exit node NAME", "nowhere: WHY"

    def render(self) -> str:
        """Readable and stable, for golden tests and the log."""
        lines = [f"domain {self.domain}", "binds " + " ".join(map(str, self.binds))]
        lines += [f"  {name} " + " ".join(map(str, addrs)) for name, addrs in sorted(self.records.items())]
        lines.append(f"default ({self.via}) " + (" ".join(map(str, self.default)) or "SERVFAIL"))
        lines += [f"split {d} " + " ".join(map(str, e)) for d, e in sorted(self.split.items())]
        return "\n".join(lines) + "\n"


def nameservers(resolv_conf: str) -> tuple[Endpoint, ...]:
    """The `nameserver` addresses of a resolv.conf text, port 53, in order; lines
    that are no address (a scope id, garbage) are skipped, as the libc resolver does."""
    found: list[Endpoint] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                endpoint = Endpoint(parse_address(words[1]), DNS_PORT)
            except ValueError:
                continue
            if endpoint not in found:
                found.append(endpoint)
    return tuple(found)


def plan_dns(netmap: Netmap, prefs: Prefs, host_resolvers: Iterable[Endpoint]) -> DnsPlan | None:
    """The resolver's plan, or None when control sends no names (capver < 3, static mode)."""
    if netmap.dns is None:
        return None
    me = netmap.self_node
    records: dict[str, tuple[IPAddress, ...]] = {}
    for node in (me, *netmap.peers):
        if node.dns_name is not None:
            records.setdefault(netmap.dns.fqdn(node.dns_name), node.addresses)
        for device in node.devices:
            records.setdefault(netmap.dns.fqdn(device.dns_name), device.addresses)
    own = set(me.addresses)
    binds = tuple(Endpoint(a, DNS_PORT) for a in me.addresses)
    default, via = _default(netmap, prefs, tuple(e for e in host_resolvers if e.host not in own))
    return DnsPlan(netmap.dns.domain, binds, records, default, _split(netmap, prefs), via)


def _default(netmap: Netmap, prefs: Prefs, host: tuple[Endpoint, ...]) -> tuple[tuple[Endpoint, ...], str]:
    if prefs.exit_node is None:
        return host, "host"
    unavailable = exit_node_unavailable(netmap, prefs.exit_node)
    exit_peer = netmap.find_peer(prefs.exit_node)
    if unavailable is not None or exit_peer is None:
        return (), f"nowhere: {unavailable}"
    return tuple(Endpoint(a, DNS_PORT) for a in exit_peer.addresses), f"exit node {exit_peer.name}"


def _split(netmap: Netmap, prefs: Prefs) -> dict[str, tuple[Endpoint, ...]]:
    """Domain -> resolvers, in netmap order: this node's own LAN (reached directly),
    then the peers whose route to their resolver this node takes."""
    split: dict[str, list[Endpoint]] = {}
    routers: list[Node] = [netmap.self_node]
    if prefs.accept_routes:
        routers += netmap.peers
    for node in routers:
        offer = node.lan_dns
        if offer is None:
            continue
        if node is not netmap.self_node and not any(offer.resolver in r for r in node.subnet_routes
                                                    if r.version == offer.resolver.version):  # fmt: skip
            continue  # control serves it only with the route; a static netmap may not
        for domain in offer.domains:
            resolvers = split.setdefault(domain, [])
            endpoint = Endpoint(offer.resolver, DNS_PORT)
            if endpoint not in resolvers:
                resolvers.append(endpoint)
    # The mesh's own names are never anyone's LAN names.
    mesh = netmap.dns.domain if netmap.dns is not None else None
    return {d: tuple(e) for d, e in split.items() if mesh is None or not _under(d, mesh)}


def _under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)

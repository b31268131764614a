"""netmap + prefs + host facts → the one DesiredState. Pure: no I/O, no clock.

Every check that can reject the input happens here, before any kernel change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_interface

from immutables import Map

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import IPNetwork
from appliance.core.conflicts import RouteConflict, in_mesh, route_conflicts
from appliance.core.model import (
    MAIN_TABLE,
    Device,
    HostedDevice,
    HostFacts,
    NftRuleset,
    Peer,
    Route,
    Rule,
    State,
    sorted_networks,
)
from appliance.core.nft import FirewallPlan, render
from appliance.core.offload import flowtable_devices, udp_gro_settings
from appliance.core.prefs import Prefs
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import EXIT_ROUTES, Mesh, Netmap, Node

# Rule priorities (all inside RULE_PRIORITIES), in the order the kernel walks them.
PRIO_MARKED = 5210  # WireGuard's own packets (fwmark): main table, never the tunnel
PRIO_LAN_TO_TUNNEL = 5230  # without LAN access: the local LAN goes through the exit node too
PRIO_SUPPRESS = 5250  # main, ignoring its default route: more specific routes still win
PRIO_TUNNEL = 5270  # everything else unmarked: the exit node's table

FORWARDING_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


def host_prefix(address: object, mesh_range: IPNetwork) -> object:
    return ip_interface(f"{address}/{mesh_range.prefixlen}")


@dataclass
class PeerMemo:
    """The last plan's peers, kept by the caller from one plan to the next. When
    the next netmap was made from the last by a delta (Netmap.origin), only the
    peers the delta touched are planned again, and the State says so
    (State.derived), so that diff() compares those peers only: a one-peer change
    costs one peer, however big the mesh. Holds the last plan only."""

    settings: tuple[object, ...] = ()
    netmap: Netmap | None = None
    # Persistent maps: the next plan changes its own version, O(change), while the
    # State made from this one keeps it as it was.
    planned: Map[PublicKey, Peer] = field(default_factory=Map)
    routed: Map[PublicKey, Node] = field(default_factory=Map)  # the peers with subnet routes
    devices: tuple[HostedDevice, ...] = ()
    state: State | None = None


@dataclass(frozen=True)
class Plan:
    """The planner's whole answer: the state to reach, and what it left out and why."""

    state: State
    # Peers' routes that collide with this host's networks or the mesh range
    # (conflicts.py); those with .set_aside are neither routed nor allowed.
    conflicts: tuple[RouteConflict, ...] = ()

    @property
    def set_aside(self) -> tuple[RouteConflict, ...]:
        return tuple(c for c in self.conflicts if c.set_aside)


def plan(
    netmap: Netmap,
    prefs: Prefs,
    private_key: PrivateKey,
    facts: HostFacts,
    source: str = "netmap",
    devices: tuple[HostedDevice, ...] = (),
    memo: PeerMemo | None = None,
) -> State:
    """The desired state alone (see make_plan for what was set aside)."""
    return make_plan(netmap, prefs, private_key, facts, source, devices, memo).state


def make_plan(
    netmap: Netmap,
    prefs: Prefs,
    private_key: PrivateKey,
    facts: HostFacts,
    source: str = "netmap",
    devices: tuple[HostedDevice, ...] = (),
    memo: PeerMemo | None = None,
) -> Plan:
    me = netmap.self_node
    if me.public_key != private_key.public_key():
        raise ConfigError(
            source,
            "self.public_key",
            str(me.public_key),
            f"is not this node's key (this node is {private_key.public_key()})",
        )
    memo = memo if memo is not None else PeerMemo()
    _check_mesh_addresses_off_host_networks(netmap, facts, source)
    exit_peer = _exit_peer(netmap, prefs)
    dev = prefs.interface

    mesh = netmap.mesh
    peers, routed, touched = _peers(netmap, prefs, exit_peer, facts, memo)
    # Routes not accepted are not used, so they conflict with nothing. Only peers
    # with subnet routes can conflict (O(those), not O(mesh)).
    assert netmap.index is not None
    holder = netmap.index.owner_of.get
    found = route_conflicts(routed.values(), mesh, facts.connected, holder)
    conflicts = found if prefs.accept_routes else tuple(c for c in found if c.in_mesh)
    aside = frozenset((c.peer, c.route) for c in conflicts if c.set_aside)
    if devices != memo.devices:
        touched = None
    with peers.mutate() as with_devices:
        for i, d in enumerate(devices):
            if d.public_key in with_devices or d.public_key == me.public_key:
                raise ConfigError(
                    "devices.json", f"[{i}].public_key", str(d.public_key), "is a node's key too"
                )
            with_devices[d.public_key] = Peer(d.public_key, sorted_networks(d.prefixes), name=d.name)
        peers = with_devices.finish()
    addresses = frozenset(
        host_prefix(a, netmap.mesh.ipv4 if a.version == 4 else netmap.mesh.ipv6) for a in me.addresses
    )
    # Mesh addresses are reached through the prefix route of our own address, in
    # main; routes inside the mesh (devices hosted by a peer, phones) are covered by
    # it too. Every other route through the tunnel lives in meshpi's own table,
    # behind `not fwmark`, as Tailscale's table 52 does: WireGuard's own packets
    # (fwmark) keep using main, so a peer whose endpoint lies inside one of its
    # own subnet routes is still reached directly, not through itself.
    routes = {
        Route(net, dev, prefs.table)
        for node in routed.values()
        if prefs.accept_routes
        for net in node.subnet_routes
        if not in_mesh(net, mesh) and (node.name, net) not in aside
    }
    if prefs.exit_node is not None:
        # Even while the chosen exit node is gone (removed, offline in control's
        # eyes, route unapproved) its routes stay: into the tunnel, where no peer
        # takes 0/0, so WireGuard drops it. Fail closed: nothing leaks out direct.
        routes |= {Route(r, dev, prefs.table) for r in EXIT_ROUTES}
    rules = _tunnel_rules(prefs, facts, {r.dst.version for r in routes})
    sysctls: dict[str, str] = {
        f"net.ipv4.conf.{dev}.rp_filter": "2",
        # A new mesh address is added before the old one goes (add before delete);
        # without this, deleting the old primary would take the new one with it.
        f"net.ipv4.conf.{dev}.promote_secondaries": "1",
    }
    if rules:
        # Replies to marked packets must pass the reverse-path check (wg-quick does the same).
        sysctls["net.ipv4.conf.all.src_valid_mark"] = "1"

    nft = None
    forwarding = prefs.forwards or bool(devices)
    if forwarding:
        sysctls.update(FORWARDING_SYSCTLS)
        sysctls.update(udp_gro_settings(facts, prefs.udp_gro_forwarding))
    if forwarding or prefs.guards_ports or netmap.dns is not None:
        # A node that only guards its ports (a dashboard, no routing) or serves mesh
        # DNS gets a table with the input policy alone: no forwarding sysctls, no
        # forward chain.
        nft = NftRuleset.from_text(render(_firewall_plan(netmap, prefs, facts, devices, forwarding)))

    previous = memo.state
    state = State(
        device=Device(dev, private_key, prefs.listen_port, prefs.fwmark, prefs.mtu),
        peers=peers,
        addresses=frozenset(addresses),  # type: ignore[arg-type]
        routes=frozenset(routes),
        rules=frozenset(rules),
        sysctls=sysctls,
        nft=nft,
        derived=None if previous is None or touched is None else (weakref.ref(previous), touched),
    )
    memo.state, memo.devices = state, devices
    return Plan(state, conflicts)


def _peers(
    netmap: Netmap, prefs: Prefs, exit_peer: Node | None, facts: HostFacts, memo: PeerMemo
) -> tuple[Map[PublicKey, Peer], Map[PublicKey, Node], frozenset[PublicKey] | None]:
    """Every peer's Peer, the peers with subnet routes, and which peers changed
    since the memo's plan (None: unknown, treat all as changed). Set-aside routes
    depend on the host's networks: those are part of the settings."""
    settings = (prefs.accept_routes, prefs.keepalive, exit_peer, netmap.mesh, facts.connected)
    origin = netmap.origin
    accept, keepalive, mesh, connected = prefs.accept_routes, prefs.keepalive, netmap.mesh, facts.connected
    assert netmap.index is not None
    holder = netmap.index.owner_of.get

    def one(node: Node) -> Peer:
        found = route_conflicts((node,), mesh, connected, holder)
        aside = frozenset(c.route for c in found if c.set_aside and (accept or c.in_mesh))
        return _peer(node, accept, keepalive, node is exit_peer, mesh, aside)

    if memo.settings == settings and origin is not None and origin[0]() is memo.netmap is not None:
        touched = origin[1]
        assert netmap.index is not None
        with memo.planned.mutate() as planned_m, memo.routed.mutate() as routed_m:
            for key in touched:
                node = netmap.index.peers.get(key)
                planned_m.pop(key, None)
                routed_m.pop(key, None)
                if node is not None:
                    planned_m[key] = one(node)
                    if node.subnet_routes:
                        routed_m[key] = node
            planned, routed = planned_m.finish(), routed_m.finish()
    else:
        touched = None
        planned = Map({n.public_key: one(n) for n in netmap.peers})
        routed = Map({n.public_key: n for n in netmap.peers if n.subnet_routes})
    memo.settings, memo.netmap, memo.planned, memo.routed = settings, netmap, planned, routed
    return planned, routed, touched


def _peer(
    node: Node,
    accept_routes: bool,
    keepalive: int,
    is_exit: bool,
    mesh: Mesh,
    set_aside: frozenset[IPNetwork] = frozenset(),
) -> Peer:
    allowed: list[IPNetwork] = [
        IPv4Network((int(a), 32)) if a.version == 4 else IPv6Network((int(a), 128)) for a in node.addresses
    ]
    # Mesh addresses behind the peer (devices it hosts) always; LAN routes if
    # accepted and not set aside (a set-aside route is not taken from the peer
    # either: it would let the tunnel speak for addresses of the local network).
    allowed += [r for r in node.subnet_routes if (accept_routes or in_mesh(r, mesh)) and r not in set_aside]
    if is_exit:
        allowed += [r for r in node.routes if r in EXIT_ROUTES]
    return Peer(
        public_key=node.public_key,
        allowed_ips=sorted_networks(allowed),
        endpoint=node.endpoint,
        # Only the side that knows an endpoint can keep a NAT mapping open.
        persistent_keepalive=keepalive if node.endpoint else 0,
        name=node.name,
    )


def _exit_peer(netmap: Netmap, prefs: Prefs) -> Node | None:
    if prefs.exit_node is None:
        return None
    peer = netmap.find_peer(prefs.exit_node)
    return peer if peer is not None and peer.is_exit_node else None


def exit_node_problem(netmap: Netmap, prefs: Prefs) -> str | None:
    """Why the chosen exit node carries no traffic now (None: it does, or none is chosen)."""
    if prefs.exit_node is None:
        return None
    unavailable = exit_node_unavailable(netmap, prefs.exit_node)
    if unavailable is None:
        return None
    return f"{unavailable}; traffic for the internet is blocked until it is back or another is chosen"


def exit_node_unavailable(netmap: Netmap, name_or_ip: str) -> str | None:
    """Why `name_or_ip` cannot be the exit node in this netmap, or None."""
    peer = netmap.find_peer(name_or_ip)
    if peer is not None and peer.is_exit_node:
        return None
    offering = ", ".join(p.name for p in netmap.peers if p.is_exit_node) or "none"
    return f"exit node {name_or_ip!r} is not a peer offering an approved exit node (offering one: {offering})"


def _tunnel_rules(prefs: Prefs, facts: HostFacts, families: set[int]) -> set[Rule]:
    """wg-quick's policy routing, for each family with a route in meshpi's table:
    marked (WireGuard's own) packets use main; main's routes win over the table
    except its default route (so the local networks stay local); the rest
    looks in the table. Without LAN access an exit node's user sends the LAN
    into the tunnel too."""
    rules: set[Rule] = set()
    for family in sorted(families):
        rules |= {
            Rule(PRIO_MARKED, family, MAIN_TABLE, fwmark=prefs.fwmark),
            Rule(PRIO_SUPPRESS, family, MAIN_TABLE, suppress_prefixlength=0),
            Rule(PRIO_TUNNEL, family, prefs.table, fwmark=prefs.fwmark, invert=True),
        }
        if prefs.exit_node is not None and not prefs.exit_node_allow_lan_access:
            rules |= {
                Rule(PRIO_LAN_TO_TUNNEL, family, prefs.table, dst=c.network)
                for c in facts.connected
                if c.network.version == family
            }
    return rules


def _firewall_plan(
    netmap: Netmap, prefs: Prefs, facts: HostFacts, devices: tuple[HostedDevice, ...], forwarding: bool
) -> FirewallPlan:
    me = netmap.self_node
    # Offered by the owner (prefs) and approved by control (netmap): both are needed.
    shared = tuple(r for r in prefs.advertise_routes if r in me.subnet_routes)
    return FirewallPlan(
        interface=prefs.interface,
        mtu=prefs.mtu,
        mesh_v4=netmap.mesh.ipv4,
        mesh_v6=netmap.mesh.ipv6,
        exit_node=prefs.advertise_exit_node and me.is_exit_node,
        shared_routes=shared,
        lan=tuple(c.network for c in facts.connected),
        foreign_forwarding=facts.forwarding_preexisting,
        devices=tuple(net for d in devices for net in d.prefixes),
        forwarding=forwarding,
        dashboard_port=prefs.dashboard_port,
        dashboard_from_mesh=prefs.dashboard_from_mesh,
        ssh_port=prefs.ssh_port,
        mesh_dns=netmap.dns is not None,
        flowtable_devices=flowtable_devices(prefs.interface, facts, prefs.flowtable) if forwarding else (),
    )


def _check_mesh_addresses_off_host_networks(netmap: Netmap, facts: HostFacts, source: str) -> None:
    """A mesh address on this host's own uplink or LAN (a CGNAT uplink in
    100.64.0.0/10) makes the mesh itself ambiguous here: nothing can be set
    aside for that, so the netmap is refused. Peers' subnet routes are
    conflicts.py's concern."""
    ranges = (netmap.mesh.ipv4, netmap.mesh.ipv6)
    if not any(
        c.network.overlaps(m) for c in facts.connected for m in ranges if m.version == c.network.version
    ):
        return  # every node's address lies in the mesh ranges (the parser checks): none here
    nodes = [("self", netmap.self_node)] + [(f"peers[{i}]", p) for i, p in enumerate(netmap.peers)]
    for c in facts.connected:
        for path, node in nodes:
            for j, addr in enumerate(node.addresses):
                if addr in c.network:
                    raise ConfigError(
                        source,
                        f"{path}.addresses[{j}]",
                        str(addr),
                        f"lies in {c.network} on this host's {c.dev}",
                    )

"""The nft ruleset of table `inet meshpi`, rendered as text. Pure.

The kernel layer wraps this body in `table inet meshpi { … }` and replaces the
whole table in one `nft -f` transaction, so there is never a half-applied firewall.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from appliance.base.net import IPNetwork
from appliance.core.model import sorted_networks
from appliance.core.offload import FLOWTABLE

# What counts as "the LAN" from an exit node: every private, link-local and
# carrier-grade range, plus whatever is connected to this host. The mesh must
# never reach these unless the owner shares a prefix as a subnet route.
PRIVATE_V4 = tuple(
    IPv4Network(n)
    for n in ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16")
)
PRIVATE_V6 = (IPv6Network("fc00::/7"), IPv6Network("fe80::/10"))
# Who may use the host's own LAN services (the input policy): the connected
# networks, and every private range, so a home with several subnets behind one
# router still reaches its dashboard. Not 100.64.0.0/10: that is the mesh's range
# and the carrier's NAT, neither of which is the LAN. The internet's sources,
# through a port forward or over routed IPv6, are never in these.
LAN_SOURCES = tuple(n for n in (*PRIVATE_V4, *PRIVATE_V6) if n != IPv4Network("100.64.0.0/10"))


@dataclass(frozen=True)
class FirewallPlan:
    interface: str
    mtu: int
    mesh_v4: IPv4Network
    mesh_v6: IPv6Network
    exit_node: bool  # mesh → internet allowed
    shared_routes: tuple[IPNetwork, ...]  # mesh → these LAN prefixes allowed
    lan: tuple[IPNetwork, ...]  # connected non-mesh prefixes of this host
    foreign_forwarding: bool  # the host routed for others before meshpi: leave that alone
    devices: tuple[IPNetwork, ...] = ()  # phones this node hosts: LAN and internet allowed
    # Does this node route for the mesh? If not, the table holds the input policy only.
    forwarding: bool = True
    # The input policy for this host's own services (0: none here, the port is left
    # alone). The dashboard answers the LAN, and the mesh only if the owner allows;
    # SSH answers the LAN and the mesh. Everything else is accepted as before.
    dashboard_port: int = 0
    dashboard_from_mesh: bool = False
    ssh_port: int = 0
    # The node's resolver (agent/dns) on its mesh addresses, port 53: for the mesh
    # only. A query for a mesh address arriving on any other interface is dropped.
    mesh_dns: bool = False
    # The flowtable's devices (core/offload.py), the mesh interface first; empty: no
    # flowtable (the kernel has none, or the owner turned it off).
    flowtable_devices: tuple[str, ...] = ()


def _set(name: str, family: str, nets: Iterable[IPNetwork]) -> list[str]:
    elements = ", ".join(str(n) for n in nets)
    return [
        f"set {name} {{",
        f"\ttype {family}_addr",
        "\tflags interval",
        "\tauto-merge",
        f"\telements = {{ {elements} }}",
        "}",
    ]


def render(plan: FirewallPlan) -> str:
    """The body of table inet meshpi."""
    if not plan.forwarding:
        return _render_input(plan, [])
    return _render_input(plan, _render_forwarding(plan))


def _chains(lines: list[str], chains: Iterable[tuple[str, list[str]]]) -> list[str]:
    for name, body in chains:
        lines.append(f"chain {name} {{")
        lines += [f"\t{line}" for line in body]
        lines.append("}")
    return lines


def _render_input(plan: FirewallPlan, forwarding: list[str]) -> str:
    """The input policy (when a guarded port is set), then the forwarding part.

    `policy accept`, with drops for the guarded ports from the wrong sources only:
    a host running meshpi is not firewalled by it beyond those ports."""
    guarded = [(name, port, mesh) for name, port, mesh in (
        ("dashboard", plan.dashboard_port, plan.dashboard_from_mesh),
        ("ssh", plan.ssh_port, True),
    ) if port]  # fmt: skip
    if not guarded and not plan.mesh_dns:
        return "\n".join(forwarding) + "\n"
    wg = f'"{plan.interface}"'
    local = sorted_networks([*LAN_SOURCES, *plan.lan])
    lines: list[str] = []
    if guarded:
        for fam, version in (("ipv4", 4), ("ipv6", 6)):
            lines += _set(f"local_{fam[-2:]}", fam, [n for n in local if n.version == version])
    lines += forwarding
    input_chain = [
        "type filter hook input priority filter; policy accept;",
        'iifname "lo" accept',
        *(f"tcp dport {port} jump {name}" for name, port, _ in guarded),
    ]
    if plan.mesh_dns:
        input_chain += [
            f"iifname != {wg} {ip} daddr {net} meta l4proto {{ tcp, udp }} th dport 53 "
            f'counter drop comment "mesh DNS answers the mesh only"'
            for ip, net in (("ip", plan.mesh_v4), ("ip6", plan.mesh_v6))
        ]
    chains = [("input", input_chain)]
    for name, _, from_mesh in guarded:
        chains.append((name, [
            f'iifname {wg} counter accept comment "from the mesh"' if from_mesh
            else f'iifname {wg} counter drop comment "from the mesh: not allowed by the owner"',
            'ip saddr @local_v4 accept comment "from the LAN"',
            'ip6 saddr @local_v6 accept comment "from the LAN"',
            'counter drop comment "not from the LAN"',
        ]))  # fmt: skip
    return "\n".join(_chains(lines, chains)) + "\n"


def _render_forwarding(plan: FirewallPlan) -> list[str]:
    """Sets and chains for routing the mesh: forward, NAT, MSS clamping."""
    wg = f'"{plan.interface}"'
    lan = sorted_networks([*PRIVATE_V4, *PRIVATE_V6, *plan.lan])
    shared = sorted_networks(plan.shared_routes)
    lines: list[str] = []
    for fam, version in (("ipv4", 4), ("ipv6", 6)):
        lines += _set(f"lan_{fam[-2:]}", fam, [n for n in lan if n.version == version])
        shared_fam = [n for n in shared if n.version == version]
        if shared_fam:
            lines += _set(f"shared_{fam[-2:]}", fam, shared_fam)
        devices_fam = [n for n in sorted_networks(plan.devices) if n.version == version]
        if devices_fam:
            lines += _set(f"devices_{fam[-2:]}", fam, devices_fam)

    from_mesh = [f'oifname {wg} accept comment "mesh to mesh, through this hub"']
    for v in ("v4", "v6"):
        if any(n.version == int(v[1]) for n in shared):
            ip = "ip" if v == "v4" else "ip6"
            from_mesh.append(f'{ip} daddr @shared_{v} accept comment "shared subnet route"')
    for v in ("v4", "v6"):
        if any(n.version == int(v[1]) for n in plan.devices):
            ip = "ip" if v == "v4" else "ip6"
            from_mesh.append(f'{ip} saddr @devices_{v} counter accept comment "a device this node hosts"')
    from_mesh += [
        'ip daddr @lan_v4 counter drop comment "the LAN is not shared"',
        'ip6 daddr @lan_v6 counter drop comment "the LAN is not shared"',
    ]
    if plan.exit_node:
        from_mesh.append('counter accept comment "exit node: mesh to internet"')
    else:
        from_mesh.append('counter drop comment "not an exit node"')

    forward = [
        "type filter hook forward priority filter; policy accept;",
        f"iifname {wg} jump from_mesh",
        f"oifname {wg} jump to_mesh",
    ]
    if not plan.foreign_forwarding:
        # meshpi turned forwarding on; it must not make this host a router for anyone else.
        forward.append('counter drop comment "not mesh traffic: this host routes only for the mesh"')

    to_mesh = [
        "ct state established,related accept",
        'counter drop comment "nothing enters the mesh uninvited"',
    ]

    v4_mss, v6_mss = plan.mtu - 40, plan.mtu - 60
    clamp = [
        "type filter hook forward priority mangle; policy accept;",
        # Leaving through the tunnel: the route's MTU is the tunnel's.
        f"oifname {wg} tcp flags syn / syn,rst counter tcp option maxseg size set rt mtu",
        # Entering from the tunnel towards a path with a bigger MTU: the far side
        # must not send segments bigger than the tunnel carries.
        f"iifname {wg} meta nfproto ipv4 tcp flags syn / syn,rst "
        f"tcp option maxseg size > {v4_mss} counter tcp option maxseg size set {v4_mss}",
        f"iifname {wg} meta nfproto ipv6 tcp flags syn / syn,rst "
        f"tcp option maxseg size > {v6_mss} counter tcp option maxseg size set {v6_mss}",
    ]

    if plan.flowtable_devices:
        # On the first answer, the flow (both directions) moves to the fast path: only
        # flows the mesh opened and from_mesh accepted are ever answered here.
        devices = ", ".join(f'"{d}"' for d in plan.flowtable_devices)
        lines += [
            f"flowtable {FLOWTABLE} {{",
            "\thook ingress priority filter",
            f"\tdevices = {{ {devices} }}",
            "}",
        ]
        to_mesh.insert(0, f"meta l4proto {{ tcp, udp }} ct state established flow add @{FLOWTABLE}")

    postrouting = [
        "type nat hook postrouting priority srcnat; policy accept;",
        f"ip saddr {plan.mesh_v4} oifname != {wg} counter masquerade",
        f"ip6 saddr {plan.mesh_v6} oifname != {wg} counter masquerade",
    ]

    return _chains(lines, (
        ("forward", forward),
        ("from_mesh", from_mesh),
        ("to_mesh", to_mesh),
        ("mss_clamp", clamp),
        ("postrouting", postrouting),
    ))  # fmt: skip

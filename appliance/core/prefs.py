"""Local preferences: what this node offers and wants, set by its owner.

Prefs persist on the device; the netmap comes from control. The planner needs both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from appliance.base.net import Endpoint, IPNetwork
from appliance.core.hostport import HostPort, parse_host_port
from appliance.core.upgrades import DEFAULT_WINDOW, Window, parse_window
from appliance.wire.dnsname import LanDns, parse_lan_dns
from appliance.wire.fields import (
    Fields,
    int_range,
    load_json,
    parse_bool,
    parse_endpoint,
    parse_ifname,
    parse_name,
    parse_network,
    parse_str,
)

BACKENDS = ("auto", "kernel", "userspace")
GPIO_PINS = 27  # BCM numbers of the 40-pin header's GPIOs: 0-27


def _parse_backend(value: object) -> str:
    text = parse_str(value)
    if text not in BACKENDS:
        raise ValueError(f"is not one of {', '.join(BACKENDS)}")
    return text


def _parse_optional_name(value: object) -> str | None:
    return None if value is None else parse_name(value)


def _any(value: object) -> object:
    return value


def _parse_optional_str(value: object) -> str | None:
    return None if value is None else parse_str(value) or None


def _parse_public_endpoint(value: object) -> HostPort | None:
    return None if value is None or value == "" else parse_host_port(value)


def _parse_update_url(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 512 or not value.isprintable() or " " in value:
        raise ValueError("must be a URL of at most 512 printable characters, no spaces")
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https") or not rest or rest.startswith("/"):
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


@dataclass(frozen=True)
class Prefs:
    interface: str = "meshpi0"
    backend: str = "auto"
    listen_port: int = 51820
    mtu: int = 1280
    # Exit-node clients mark WireGuard's own packets with fwmark and route the
    # rest through `table`, as wg-quick does (both default to 51820 = 0xca6c).
    fwmark: int = 51820
    table: int = 51820
    keepalive: int = 25
    advertise_exit_node: bool = False
    advertise_routes: tuple[IPNetwork, ...] = ()
    accept_routes: bool = True
    exit_node: str | None = None  # a peer's name or mesh address
    exit_node_allow_lan_access: bool = False
    hostname: str | None = None  # the name asked of control; None: the system's
    # Where peers can reach this node from the internet (a port forward on the home
    # router): until NAT traversal finds them, the owner says so.
    advertise_endpoints: tuple[Endpoint, ...] = ()
    # What phones (stock WireGuard apps, which cannot punch) dial: a DNS name the
    # owner keeps pointed at home (dynamic DNS), host[:port]; None: found out
    # (reach/phones.py: the mapped port, else a forward's public address).
    public_endpoint: HostPort | None = None
    # Split DNS for the LAN this node routes (a subnet router): its search domains and
    # resolver, told to control, served to peers with the route that holds the resolver.
    advertise_dns: LanDns | None = None
    # Status LEDs: one on each of these BCM GPIO pins, and the board's own ACT
    # (or led0) LED under /sys/class/leds when there is one.
    led_pins: tuple[int, ...] = ()
    act_led: bool = True
    # Reachability: ask the home router for a mapping of the WireGuard port
    # (PCP, NAT-PMP, UPnP-IGD); STUN servers beside control's own (host:3478).
    port_mapping: bool = True
    stun_servers: tuple[Endpoint, ...] = ()
    # The input policy of table inet meshpi for this host's own services (the
    # appliance image sets 80 and 22; 0: not on this host, the port is left alone).
    # The dashboard answers the LAN only, and the mesh too when dashboard_from_mesh;
    # SSH answers the LAN and the mesh, never the internet.
    dashboard_port: int = 0
    dashboard_from_mesh: bool = False
    ssh_port: int = 0
    # Point the host's DNS (systemd-resolved's link settings, or resolv.conf) at
    # the mesh's resolver; false: the host's DNS is left (put back) as it was.
    accept_dns: bool = True
    # Debian's security updates (core/upgrades.py): unattended-upgrades from the security
    # and stable-updates archives, nightly in this window (local time), rebooting there
    # after a kernel or libc update. On by default: an appliance on the internet.
    auto_upgrades: bool = True
    upgrade_window: Window = DEFAULT_WINDOW
    # Where root's daily meshpi-update-check fetches a signed bundle (http or https);
    # None: updates only from the dashboard or the console.
    update_url: str | None = None
    # Forwarding fast paths where the kernel has them (core/offload.py): established
    # flows offloaded to an nft flowtable; UDP GRO forwarding on the uplink.
    flowtable: bool = True
    udp_gro_forwarding: bool = True

    @property
    def guards_ports(self) -> bool:
        """Does this node keep an input policy for its own services?"""
        return bool(self.dashboard_port or self.ssh_port)

    @property
    def forwards(self) -> bool:
        """Does this node route for the mesh (exit node or subnet router)?"""
        return self.advertise_exit_node or bool(self.advertise_routes)

    def with_changes(self, **changes: Any) -> Prefs:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["advertise_routes"] = [str(r) for r in self.advertise_routes]
        out["advertise_endpoints"] = [str(e) for e in self.advertise_endpoints]
        out["public_endpoint"] = str(self.public_endpoint) if self.public_endpoint is not None else None
        out["led_pins"] = list(self.led_pins)
        out["stun_servers"] = [str(e) for e in self.stun_servers]
        out["advertise_dns"] = None if self.advertise_dns is None else self.advertise_dns.to_json()
        out["upgrade_window"] = str(self.upgrade_window)
        return out


def parse_prefs(obj: object, source: str = "prefs") -> Prefs:
    f = Fields(source, "", obj)
    d = Prefs()
    prefs = Prefs(
        interface=f.get("interface", parse_ifname, d.interface),
        backend=f.get("backend", _parse_backend, d.backend),
        listen_port=f.get("listen_port", int_range(1, 65535), d.listen_port),
        mtu=f.get("mtu", int_range(1280, 9000), d.mtu),
        fwmark=f.get("fwmark", int_range(1, 0xFFFFFFFF), d.fwmark),
        table=f.get("table", int_range(1, 0xFFFFFFFF - 1), d.table),
        keepalive=f.get("keepalive", int_range(0, 65535), d.keepalive),
        advertise_exit_node=f.get("advertise_exit_node", parse_bool, d.advertise_exit_node),
        advertise_routes=f.get_list("advertise_routes", parse_network),
        accept_routes=f.get("accept_routes", parse_bool, d.accept_routes),
        exit_node=f.get("exit_node", _parse_optional_str, d.exit_node),
        exit_node_allow_lan_access=f.get(
            "exit_node_allow_lan_access", parse_bool, d.exit_node_allow_lan_access
        ),
        hostname=f.get("hostname", _parse_optional_name, d.hostname),
        advertise_endpoints=f.get_list("advertise_endpoints", parse_endpoint),
        public_endpoint=f.get("public_endpoint", _parse_public_endpoint, d.public_endpoint),
        advertise_dns=None if f.obj.get("advertise_dns") is None else parse_lan_dns(f.sub("advertise_dns")),
        led_pins=f.get_list("led_pins", int_range(0, GPIO_PINS)),
        act_led=f.get("act_led", parse_bool, d.act_led),
        port_mapping=f.get("port_mapping", parse_bool, d.port_mapping),
        stun_servers=f.get_list("stun_servers", parse_endpoint),
        dashboard_port=f.get("dashboard_port", int_range(0, 65535), d.dashboard_port),
        dashboard_from_mesh=f.get("dashboard_from_mesh", parse_bool, d.dashboard_from_mesh),
        ssh_port=f.get("ssh_port", int_range(0, 65535), d.ssh_port),
        accept_dns=f.get("accept_dns", parse_bool, d.accept_dns),
        auto_upgrades=f.get("auto_upgrades", parse_bool, d.auto_upgrades),
        upgrade_window=f.get("upgrade_window", parse_window, d.upgrade_window),
        update_url=f.get("update_url", _parse_update_url, d.update_url),
        flowtable=f.get("flowtable", parse_bool, d.flowtable),
        udp_gro_forwarding=f.get("udp_gro_forwarding", parse_bool, d.udp_gro_forwarding),
    )
    if prefs.table in (253, 254, 255):
        raise f.error("table", prefs.table, "is a table the kernel reserves (default/main/local)")
    for i, route in enumerate(prefs.advertise_routes):
        if route.prefixlen == 0:
            raise f.error(
                f"advertise_routes[{i}]",
                str(route),
                "is a default route: use advertise_exit_node to offer an exit node",
            )
    f.get("advertise_dns", _any, None)
    offer = prefs.advertise_dns
    if offer is not None and not any(
        offer.resolver in r for r in prefs.advertise_routes if r.version == offer.resolver.version
    ):
        why = "is in none of advertise_routes: peers reach the LAN's resolver through those"
        raise f.error("advertise_dns.resolver", str(offer.resolver), why)
    if prefs.ssh_port and prefs.ssh_port == prefs.dashboard_port:
        raise f.error("ssh_port", prefs.ssh_port, "is the dashboard's port too")
    for i, pin in enumerate(prefs.led_pins):
        if pin in prefs.led_pins[:i]:
            raise f.error(f"led_pins[{i}]", pin, "is listed twice")
    f.done()
    return prefs


def load_prefs(path: Path) -> Prefs:
    return parse_prefs(load_json(path), str(path))


def dump_prefs(prefs: Prefs) -> str:
    return json.dumps(prefs.to_json(), indent=2) + "\n"

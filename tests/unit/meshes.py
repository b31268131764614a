"""Deterministic keys, netmaps and host facts for unit tests."""

from __future__ import annotations

from ipaddress import ip_network
from typing import Any

from appliance.base.keys import PrivateKey
from appliance.core.model import Connected, HostFacts
from appliance.wire.netmap import Netmap, parse_netmap

MESH = {"ipv4": "100.64.0.0/10", "ipv6": "fd7a:6d70:6900::/48"}
KEYS = {name: PrivateKey(bytes([i + 1]) * 32) for i, name in enumerate(["pi", "laptop", "phone", "office"])}
ADDRS = {
    "pi": ["100.64.0.1", "fd7a:6d70:6900::1"],
    "laptop": ["100.64.0.2", "fd7a:6d70:6900::2"],
    "phone": ["100.64.0.3", "fd7a:6d70:6900::3"],
    "office": ["100.64.0.4", "fd7a:6d70:6900::4"],
}
PI_ROUTES = ["0.0.0.0/0", "::/0", "192.168.77.0/24"]

PI_FACTS = HostFacts(
    (
        Connected("eth0", ip_network("192.168.77.0/24")),
        Connected("eth0", ip_network("2001:db8:1::/64")),
    )
)
LAPTOP_FACTS = HostFacts((Connected("eth0", ip_network("10.77.0.0/24")),))


def node(name: str, routes: list[str] | None = None, endpoint: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "public_key": str(KEYS[name].public_key()),
        "addresses": ADDRS[name],
        "routes": routes or [],
    }
    if endpoint:
        out["endpoint"] = endpoint
    return out


def netmap_json(me: str, peers: list[dict[str, Any]], my_routes: list[str] | None = None) -> dict[str, Any]:
    return {"mesh": MESH, "self": node(me, my_routes), "peers": peers}


def pi_netmap(pi_routes: list[str] | None = None, peers: tuple[str, ...] = ("laptop",)) -> Netmap:
    return parse_netmap(
        netmap_json("pi", [node(p) for p in peers], PI_ROUTES if pi_routes is None else pi_routes)
    )


def laptop_netmap(pi_routes: list[str] | None = None) -> Netmap:
    pi = node("pi", PI_ROUTES if pi_routes is None else pi_routes, endpoint="198.51.100.1:51820")
    return parse_netmap(netmap_json("laptop", [pi]))

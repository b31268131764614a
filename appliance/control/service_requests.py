"""What a node's request to control may say: each op's body parsed and checked
before the store is touched, and the answer to a registration.

Apart from the operations (service.py) because it is all about the untrusted
input: the counts are checked before the parsing (a refused request costs no
parsing of 40,000 routes), and every refusal is an `ApiError` whose message
names the field and is safe to show the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.control import limits
from appliance.control.store_records import NodeRecord
from appliance.wire.dnsname import MAX_LAN_DOMAINS, LanDns, parse_lan_dns
from appliance.wire.fields import (
    ConfigError,
    Fields,
    int_range,
    parse_bool,
    parse_endpoint,
    parse_network,
    parse_public_key,
    parse_str,
)
from appliance.wire.netmap import Mesh


class ApiError(Exception):
    """A refusal the client may see: the message is safe to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Offer:
    """An `update`: what the node offers the mesh."""

    endpoints: tuple[Endpoint, ...]
    routes: tuple[IPNetwork, ...]
    exit_node: bool
    lan_dns: LanDns | None


def fields(body: object) -> Fields:
    try:
        return Fields("request", "", body)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


def parse_register(body: object) -> tuple[PublicKey, str, str | None]:
    """`register`: the node key, the hostname and maybe a pre-auth key."""
    f = fields(body)
    node_key = f.require("node_key", parse_public_key)
    hostname = f.require("hostname", parse_str)
    auth_key = f.get("auth_key", _optional_str, None)
    f.done()
    return node_key, hostname, auth_key


def parse_update(body: object, mesh: Mesh) -> Offer:
    f = fields(body)
    try:
        for field, cap in (("endpoints", limits.MAX_ENDPOINTS), ("advertise_routes", limits.MAX_ROUTES)):
            items = body.get(field) if isinstance(body, dict) else None
            if isinstance(items, list):
                limits.check_count(field, items, cap)
        offer = body.get("advertise_dns") if isinstance(body, dict) else None
        if isinstance(offer, dict) and isinstance(offer.get("domains"), list):
            limits.check_count("advertise_dns.domains", offer["domains"], MAX_LAN_DOMAINS)
        endpoints = f.get_list("endpoints", parse_endpoint)
        routes = f.get_list("advertise_routes", parse_network)
        exit_node = f.get("advertise_exit_node", parse_bool, False)
        # Split DNS for its LAN (optional: an agent from before names sends none).
        lan_dns = None if f.obj.get("advertise_dns") is None else parse_lan_dns(f.sub("advertise_dns"))
        f.get("advertise_dns", _any, None)
        f.done()
        limits.check_routes(mesh, routes)
    except (limits.LimitError, ConfigError) as e:
        raise ApiError(400, str(e)) from None
    return Offer(endpoints, routes, exit_node, lan_dns)


def parse_map(body: object) -> tuple[int | None, int]:
    """`map`: the version the node holds (None: a full map) and its capability version."""
    f = fields(body)
    version = f.get("version", _optional_version, None)
    # What the agent can read (wire/netmap.py); an agent from before versioning sends none.
    capver = f.get("capver", int_range(1, 1 << 30), 1)
    f.done()
    return version, capver


def parse_device(body: object) -> tuple[str, PublicKey, str | None]:
    """`device`: the action, the device's key and maybe its name."""
    f = fields(body)
    action = f.require("action", parse_str)
    public_key = f.require("public_key", parse_public_key)
    name = f.get("name", _device_name, None)
    f.done()
    return action, public_key, name


def registered(node: NodeRecord, now: datetime) -> dict[str, Any]:
    return {
        "state": node.state.value,
        "name": node.name,
        "dns_name": node.dns_name,  # None while pending
        # Sealed, so the node can trust it: a node whose key expired rotates it.
        "key_expired": node.key_expired(now),
        "addresses": [str(a) for a in node.addresses],  # none while pending
    }


def _device_name(value: object) -> str:
    name = parse_str(value)
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise ValueError("must be a name of 1-64 printable characters")
    return name


def _any(value: object) -> object:
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else parse_str(value)


def _optional_version(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be a version number or null")
    return value

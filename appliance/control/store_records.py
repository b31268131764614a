"""The control store's vocabulary: rows as frozen dataclasses, and its errors.

Everything here is plain data and pure conversion; store.py does the I/O. Rows
use the program's types (PublicKey, ipaddress, aware datetimes); the database
sees bytes, integers (Unix seconds) and JSON text, the same in both dialects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPAddress, IPNetwork
from appliance.core.model import sorted_networks
from appliance.wire.dnsname import LanDns, parse_lan_dns, unique_label
from appliance.wire.fields import Fields, parse_endpoint
from appliance.wire.netmap import Mesh

# --- errors -------------------------------------------------------------------------


class StoreError(Exception):
    """Root of everything the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be opened or reached; the message names it."""


class StoreCorrupt(StoreUnavailable):
    """The SQLite file is not a database, or is damaged; the message names the file."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer meshpi than this one."""


class MeshFull(StoreError):
    """Every address of the mesh's IPv4 range has been handed out once."""


class NotFound(StoreError, LookupError):
    """No node, or no pre-auth key, with that id."""


class NodeExists(StoreError):
    """The machine key or node key already belongs to a node."""


class NameInvalid(StoreError, ValueError):
    """A name that cannot become a DNS label; the message quotes it."""


class TooManyPending(StoreError):
    """Registrations waiting for approval are at their cap (from this source, or in all)."""


class DeltaUnavailable(StoreError):
    """Tombstones before this version were pruned: the caller must send a full map."""


class AuthKeyError(StoreError):
    """A pre-auth key was refused. The message is safe to show the client."""


class KeyInvalid(AuthKeyError):
    """Malformed, unknown, or the secret does not match (which of these, we do not say)."""


class KeyExpired(AuthKeyError):
    pass


class KeyUsed(AuthKeyError):
    pass


class KeyRevoked(AuthKeyError):
    pass


# --- rows -----------------------------------------------------------------------------


class NodeState(StrEnum):
    PENDING = "pending"  # waits for an admin: no netmap yet
    APPROVED = "approved"


@dataclass(frozen=True)
class NodeRecord:
    id: int
    machine_key: PublicKey
    node_key: PublicKey
    name: str
    address_index: int | None  # None while pending: addresses come with approval
    ipv4: IPv4Address | None
    ipv6: IPv6Address | None
    state: NodeState
    tags: tuple[str, ...]
    advertised_routes: tuple[IPNetwork, ...]  # what the node offers
    approved_routes: tuple[IPNetwork, ...]  # what an admin allowed
    endpoints: tuple[Endpoint, ...]
    created: datetime
    last_seen: datetime | None
    key_expiry: datetime | None  # None: the key never expires
    expiry_exempt: bool
    version: int  # the mesh version at which this node last changed
    devices: tuple[DeviceRecord, ...] = ()  # stock WireGuard clients it hosts
    dns_name: str | None = None  # its DNS label; None while pending (schema version 4)
    advertised_dns: LanDns | None = None  # split DNS it offers for its subnet routes

    @property
    def served_lan_dns(self) -> LanDns | None:
        """The split DNS peers are told of: only while its resolver lies inside a
        subnet route the node serves (approved with the route, reached over the mesh)."""
        offer = self.advertised_dns
        if offer is None:
            return None
        subnets = [r for r in self.served_routes if r.prefixlen > 0 and r.version == offer.resolver.version]
        return offer if any(offer.resolver in r for r in subnets) else None

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """Both mesh addresses, or none for a node still pending."""
        return () if self.ipv4 is None or self.ipv6 is None else (self.ipv4, self.ipv6)

    @property
    def served_routes(self) -> tuple[IPNetwork, ...]:
        """Routes peers may send here: approved *and* still advertised, and the
        mesh addresses of the devices it hosts (control gave them to it)."""
        advertised = set(self.advertised_routes)
        hosted = tuple(net for d in self.devices for net in d.prefixes)
        return tuple(r for r in self.approved_routes if r in advertised) + hosted

    def key_expired(self, now: datetime) -> bool:
        if self.expiry_exempt or self.key_expiry is None:
            return False
        return self.key_expiry <= now


@dataclass(frozen=True)
class DeviceRecord:
    """A stock WireGuard client (a phone) hosted by a node: its mesh addresses come
    from the mesh's counter, so they are never handed out twice either."""

    name: str
    public_key: PublicKey
    index: int
    ipv4: IPv4Address
    ipv6: IPv6Address
    dns_name: str | None = None  # its DNS label (schema version 4)

    @property
    def prefixes(self) -> tuple[IPNetwork, IPNetwork]:
        return (IPv4Network((self.ipv4, 32)), IPv6Network((self.ipv6, 128)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "public_key": str(self.public_key),
                "addresses": [str(self.ipv4), str(self.ipv6)], "dns_name": self.dns_name}  # fmt: skip


@dataclass(frozen=True)
class Tombstone:
    """A node key that peers must drop: its node was removed or rotated away from it."""

    public_key: PublicKey
    version: int


@dataclass(frozen=True)
class Changes:
    """What changed after a version, complete up to `version` (one snapshot)."""

    version: int
    nodes: tuple[NodeRecord, ...]
    tombstones: tuple[Tombstone, ...]


@dataclass(frozen=True)
class PreauthKey:
    id: int
    reusable: bool
    created: datetime
    expires_at: datetime
    tags: tuple[str, ...]
    used: int  # how many registrations it admitted
    revoked: bool

    @property
    def prefix(self) -> str:
        """What an admin sees of the key after creation: enough to tell keys apart."""
        return f"mpk-{self.id}-"


# --- conversions ------------------------------------------------------------------------

# 100.64.0.0 itself and 100.127.255.255 are not handed out: index 0 is the network,
# the last one would look like a broadcast address to some stacks.
FIRST_INDEX = 1
IPV4_RANGE = IPv4Network("100.64.0.0/10")


def address_pair(mesh: Mesh, index: int) -> tuple[IPv4Address, IPv6Address]:
    return (mesh.ipv4.network_address + index, mesh.ipv6.network_address + index)


def last_index(mesh: Mesh) -> int:
    return min(mesh.ipv4.num_addresses, mesh.ipv6.num_addresses) - 2


def to_epoch(when: datetime) -> int:
    if when.tzinfo is None:
        # A naive time is local or UTC depending on who wrote it: refuse to guess.
        raise ValueError(f"{when!r} has no time zone")
    return int(when.timestamp())


def from_epoch(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def dump_tags(tags: Iterable[str]) -> str:
    return json.dumps(sorted(set(tags)))


def load_tags(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def dump_routes(routes: Iterable[IPNetwork]) -> str:
    return json.dumps([str(r) for r in sorted_networks(routes)])


def load_routes(text: str) -> tuple[IPNetwork, ...]:
    return tuple(ip_network(r) for r in json.loads(text))


def dump_endpoints(endpoints: Iterable[Endpoint]) -> str:
    # Order kept: the agent lists its best candidate first.
    return json.dumps([str(e) for e in dict.fromkeys(endpoints)])


def load_endpoints(text: str) -> tuple[Endpoint, ...]:
    return tuple(parse_endpoint(e) for e in json.loads(text))


_NOT_IN_LABEL = re.compile(r"[^a-z0-9-]+")
NAME_MAX = 63


def name_base(hostname: str) -> str:
    """A DNS label made from whatever the machine calls itself ("My Laptop!" -> my-laptop)."""
    first = hostname.strip().lower().split(".")[0]
    label = _NOT_IN_LABEL.sub("-", first).strip("-")
    # Room for a "-NNNNN" suffix, so a taken name can always be made unique.
    return label[: NAME_MAX - 6].rstrip("-") or "node"


def pick_name(base: str, taken: Iterable[str]) -> str:
    """`base`, or `base-2`, `base-3`, …: the lowest one not in `taken` (as DNS labels are made)."""
    return unique_label(base, set(taken))


# A row as the driver returns it: sqlite3 and psycopg agree on int, str and bytes
# for the column types the migrations use (booleans are 0/1 in SQLite, so bool()).
Row = Sequence[Any]

NODE_COLUMNS = (
    "id, machine_key, node_key, name, address_index, state, tags, advertised_routes, "
    "approved_routes, endpoints, created, last_seen, key_expiry, expiry_exempt, version, devices, "
    "dns_name, advertised_dns"
)


def dump_devices(devices: Iterable[DeviceRecord]) -> str:
    return json.dumps([
        {"name": d.name, "public_key": str(d.public_key), "index": d.index}
        | ({} if d.dns_name is None else {"dns_name": d.dns_name})
        for d in devices
    ])  # fmt: skip


def load_devices(mesh: Mesh, text: str) -> tuple[DeviceRecord, ...]:
    out = []
    for doc in json.loads(text):
        index = int(doc["index"])
        key = PublicKey.from_base64(doc["public_key"])
        out.append(DeviceRecord(doc["name"], key, index, *address_pair(mesh, index), doc.get("dns_name")))
    return tuple(out)


def node_from_row(mesh: Mesh, row: Row) -> NodeRecord:
    """A nodes row, selected as NODE_COLUMNS, as a record."""
    (id_, machine_key, node_key, name, index, state, tags, advertised, approved, endpoints,
     created, last_seen, key_expiry, exempt, version, devices, dns_name, advertised_dns) = row  # fmt: skip
    ipv4, ipv6 = (None, None) if index is None else address_pair(mesh, index)
    return NodeRecord(
        id=id_,
        machine_key=PublicKey(bytes(machine_key)),
        node_key=PublicKey(bytes(node_key)),
        name=name,
        address_index=index,
        ipv4=ipv4,
        ipv6=ipv6,
        state=NodeState(state),
        tags=load_tags(tags),
        advertised_routes=load_routes(advertised),
        approved_routes=load_routes(approved),
        endpoints=load_endpoints(endpoints),
        created=datetime.fromtimestamp(created, UTC),
        last_seen=from_epoch(last_seen),
        key_expiry=from_epoch(key_expiry),
        expiry_exempt=bool(exempt),
        version=version,
        devices=load_devices(mesh, devices),
        dns_name=dns_name,
        advertised_dns=load_lan_dns(advertised_dns),
    )


def dump_lan_dns(offer: LanDns | None) -> str | None:
    return None if offer is None else json.dumps(offer.to_json())


def load_lan_dns(text: str | None) -> LanDns | None:
    return None if text is None else parse_lan_dns(Fields("store", "advertised_dns", json.loads(text)))


PREAUTH_COLUMNS = "id, reusable, created, expires, tags, used, revoked"


def preauth_from_row(row: Row) -> PreauthKey:
    id_, reusable, created, expires, tags, used, revoked = row
    return PreauthKey(
        id=id_,
        reusable=bool(reusable),
        created=datetime.fromtimestamp(created, UTC),
        expires_at=datetime.fromtimestamp(expires, UTC),
        tags=load_tags(tags),
        used=used,
        revoked=bool(revoked),
    )


def mesh_from_row(ipv4: object, ipv6: object) -> Mesh:
    v4, v6 = ip_network(str(ipv4)), ip_network(str(ipv6))
    assert isinstance(v4, IPv4Network) and isinstance(v6, IPv6Network)
    return Mesh(v4, v6)

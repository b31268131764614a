"""What the resolver serves: the mesh zone (names -> addresses, and back) and where
other names go. Plain values, checked when made, so the server never meets a bad one.

`ZoneIndex` is the lookup form the server keeps: built once per update, then only read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

from appliance.base.net import Endpoint

# Short, so a client's own cache (systemd-resolved keeps answers for their TTL) sees a
# rename within seconds; asking the node's own resolver again is cheap.
MESH_TTL = 5
# Negative answers (NXDOMAIN, NODATA) are cached by clients for the SOA minimum (RFC 2308).
NEGATIVE_TTL = 5

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 253:
        raise ValueError(f"{what}: not a DNS name: {value!r}")
    if value != value.lower() or value.endswith("."):
        raise ValueError(f"{what}: must be lowercase without a trailing dot: {value!r}")
    for label in value.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{what}: bad label {label!r} in {value!r} (letters, digits, '-', '_')")
    return value


def _check_endpoints(value: object, what: str) -> tuple[Endpoint, ...]:
    if not isinstance(value, tuple) or not all(isinstance(e, Endpoint) for e in value):
        raise ValueError(f"{what}: must be a tuple of Endpoint: {value!r}")
    for endpoint in value:
        if not 0 < endpoint.port < 65536:
            raise ValueError(f"{what}: bad port in {endpoint}")
    return value


def under(name: str, domain: str) -> bool:
    """True when name is domain or a name below it (label-wise, not string-wise)."""
    return name == domain or name.endswith("." + domain)


@dataclass(frozen=True)
class Zone:
    """The mesh names: fqdn (lowercase, no trailing dot, under domain) -> addresses.

    Served: A/AAAA for the names, PTR for their addresses, NXDOMAIN for unknown names
    under domain, NODATA for a known name without that family, the SOA with negative answers.
    """

    domain: str
    records: Mapping[str, tuple[IPv4Address | IPv6Address, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name(self.domain, "zone domain")
        for name, addresses in self.records.items():
            _check_name(name, "zone record")
            if not under(name, self.domain):
                raise ValueError(f"zone record {name!r} is not under the domain {self.domain!r}")
            if not isinstance(addresses, tuple) or not all(
                isinstance(a, IPv4Address | IPv6Address) for a in addresses
            ):
                raise ValueError(
                    f"zone record {name!r}: addresses must be a tuple of IP addresses: {addresses!r}"
                )
        # A copy the caller cannot change behind the server's back.
        object.__setattr__(self, "records", MappingProxyType(dict(self.records)))


@dataclass(frozen=True)
class Upstreams:
    """Where names outside the zone go, tried in order. An empty tuple fails closed:
    SERVFAIL, never a fallback to some other resolver (that is how DNS leaks)."""

    default: tuple[Endpoint, ...] = ()
    # Domain suffix -> resolvers (split DNS, e.g. the home LAN's "fritz.box"); the longest match wins.
    split: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_endpoints(self.default, "upstreams default")
        for suffix, endpoints in self.split.items():
            _check_name(suffix, "split DNS domain")
            _check_endpoints(endpoints, f"split DNS {suffix!r}")
        object.__setattr__(self, "split", MappingProxyType(dict(self.split)))

    def for_name(self, name: str) -> tuple[Endpoint, ...]:
        """The resolvers for a lowercase name (no trailing dot): longest split suffix, else default."""
        best, chosen = -1, self.default
        for suffix, endpoints in self.split.items():
            if len(suffix) > best and under(name, suffix):
                best, chosen = len(suffix), endpoints
        return chosen


def reverse_name(address: IPv4Address | IPv6Address) -> str:
    """The PTR owner of an address, e.g. 1.0.64.100.in-addr.arpa (no trailing dot)."""
    return address.reverse_pointer.lower()


@dataclass(frozen=True)
class ZoneIndex:
    """The zone as the server looks it up: names, reverse names, and the empty
    non-terminals (names with nothing of their own but names below them: NODATA, not
    NXDOMAIN, RFC 8020)."""

    zone: Zone
    v4: Mapping[str, tuple[IPv4Address, ...]]
    v6: Mapping[str, tuple[IPv6Address, ...]]
    ptr: Mapping[str, tuple[str, ...]]
    nodes: frozenset[str]

    @classmethod
    def build(cls, zone: Zone) -> ZoneIndex:
        v4: dict[str, tuple[IPv4Address, ...]] = {}
        v6: dict[str, tuple[IPv6Address, ...]] = {}
        ptr: dict[str, list[str]] = {}
        nodes = {zone.domain}
        for name, addresses in zone.records.items():
            v4[name] = tuple(a for a in addresses if isinstance(a, IPv4Address))
            v6[name] = tuple(a for a in addresses if isinstance(a, IPv6Address))
            for address in addresses:
                ptr.setdefault(reverse_name(address), []).append(name)
            labels = name.split(".")
            for i in range(len(labels)):
                nodes.add(".".join(labels[i:]))
        return cls(zone, v4, v6, {k: tuple(sorted(v)) for k, v in ptr.items()}, frozenset(nodes))

"""The contracts of the kernel layer, one small Protocol per concern.

`System` (system.py) composes one of each; `fake.py` has an in-memory twin of each.
Every implementation follows the same rules:
- removing something that is already gone is not an error;
- adding something that is already there is not an error;
- any other failure raises a KernelError subclass that says what failed on which object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint, IPInterface
from appliance.core.model import Connected, NftRuleset, Peer, Route, Rule, Scope


class KernelError(Exception):
    """Something the kernel (or wireguard-go, or nft) refused."""


class InterfaceNotFound(KernelError, LookupError):
    pass


class WireGuardUnavailable(KernelError, OSError):
    """This backend cannot make a WireGuard device here (no module, no wireguard-go)."""


class PermissionDenied(KernelError, PermissionError):
    pass


@dataclass(frozen=True)
class PeerStats:
    last_handshake: float | None  # unix time, None if never
    rx_bytes: int
    tx_bytes: int
    endpoint: Endpoint | None  # where the kernel sends now (may have roamed)


@dataclass(frozen=True)
class WgDevice:
    """A WireGuard device as the backend reports it."""

    private_key: PrivateKey | None
    listen_port: int
    fwmark: int
    peers: Mapping[PublicKey, Peer]
    stats: Mapping[PublicKey, PeerStats] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class WgUpdate:
    """One transaction on a WireGuard device.

    Device fields left None are not touched. An upserted peer that exists has its
    allowed IPs *replaced*, its keepalive set, and its endpoint set when the peer's
    endpoint is not None (None keeps whatever the peer roamed to)."""

    private_key: PrivateKey | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    upsert: tuple[Peer, ...] = ()
    remove: tuple[PublicKey, ...] = ()


class WireGuardBackend(Protocol):
    name: str  # "kernel" or "userspace"

    def create(self, ifname: str) -> None:
        """Create a WireGuard interface (link down, no config)."""

    def read(self, ifname: str) -> WgDevice | None:
        """The device's config and peer stats; None if there is no such WireGuard interface."""

    def configure(self, ifname: str, update: WgUpdate) -> None:
        """Apply one update. Raises InterfaceNotFound if the device is gone."""


class Links(Protocol):
    """Links, addresses, routes and rules (netlink)."""

    def exists(self, ifname: str) -> bool: ...

    def mtu(self, ifname: str) -> int | None: ...

    def set_mtu_up(self, ifname: str, mtu: int) -> None:
        """Set the MTU and bring the link up."""

    def delete_link(self, ifname: str) -> None: ...

    def addresses(self, ifname: str) -> frozenset[IPInterface]: ...

    def add_address(self, ifname: str, address: IPInterface) -> None: ...

    def remove_address(self, ifname: str, address: IPInterface) -> None: ...

    def routes(self, scope: Scope) -> frozenset[Route]:
        """Routes meshpi owns: those meshpi added via scope.interface in the main
        table (not the kernel's own prefix routes), and every route in scope.table."""

    def add_route(self, route: Route) -> None: ...

    def remove_route(self, route: Route) -> None: ...

    def rules(self, scope: Scope) -> frozenset[Rule]:
        """Rules with a priority in RULE_PRIORITIES, v4 and v6."""

    def add_rule(self, rule: Rule) -> None: ...

    def remove_rule(self, rule: Rule) -> None: ...

    def connected(self, exclude: str) -> tuple[Connected, ...]:
        """Prefixes connected on interfaces other than `exclude` and loopback: the
        kernel's own link-scope routes in the main table, without link-local v6."""

    def probe(self, ifname: str, address: IPv4Address | IPv6Address) -> None:
        """Send one empty UDP datagram to `address` (discard port) out of `ifname`.
        Into a WireGuard interface, that starts a handshake with the peer now."""


class Firewall(Protocol):
    """Table `inet meshpi`, always replaced whole, in one nft transaction."""

    def digest(self) -> str | None:
        """The digest in the table's comment; None if there is no table; "" if
        the table exists but carries no meshpi digest, or no longer holds that
        ruleset whole (a rule, chain or set changed by hand: the diff replaces it)."""

    def replace(self, ruleset: NftRuleset) -> None: ...

    def delete(self) -> None: ...


class ProcSys(Protocol):
    """Raw access to /proc/sys; keys are dotted (net.ipv4.ip_forward)."""

    def read(self, key: str) -> str: ...

    def write(self, key: str, value: str) -> None: ...

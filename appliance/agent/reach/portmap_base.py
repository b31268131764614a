"""What every port-mapping client (PCP, NAT-PMP, UPnP-IGD) gives the PortMapper.

The gateway is the IPv4 default route's next hop, read from the calling thread's own
network namespace; the node's LAN address is the source address the kernel picks
towards it, which is the address a mapping must point at.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

from appliance.base.net import Endpoint

# /proc/self/net is the namespace of the process's main thread; the mapper's own thread
# may live in another one (the lab enters namespaces per thread), so ask for this thread's.
ROUTE_TABLE = Path("/proc/thread-self/net/route")
_RTF_UP, _RTF_GATEWAY = 0x1, 0x2


class PortMapError(Exception):
    """A mapping could not be made, renewed or removed; the message says why."""


class NoGateway(PortMapError):
    """There is no IPv4 default route with a gateway."""


class NotSpoken(PortMapError):
    """The gateway does not speak this protocol (silent, port unreachable, another version)."""


class Refused(PortMapError):
    """The gateway speaks the protocol and said no."""


@dataclass(frozen=True)
class Lease:
    """One mapping as the gateway granted it."""

    protocol: str  # "pcp" | "nat-pmp" | "upnp"
    transport: str  # "udp" | "tcp"
    internal: Endpoint
    external: Endpoint
    lifetime: int  # seconds granted; 0: until removed (a UPnP router that only grants permanent leases)
    epoch: int | None  # the gateway's epoch (PCP, NAT-PMP) when it answered


@dataclass(frozen=True)
class Seen:
    """What a cheap look at the gateway told about a lease (None: this protocol cannot tell)."""

    epoch: int | None
    external_address: IPv4Address | None
    present: bool | None


class Client(Protocol):
    """One protocol towards one gateway. Every call may block for a few seconds at most;
    `cancel`, once set, makes waits for answers end early (except in unmap)."""

    name: str

    def map(self, transport: str, internal_port: int, external_port: int, lifetime: int) -> Lease: ...

    def probe(self, lease: Lease) -> Seen: ...

    def unmap(self, lease: Lease) -> None: ...

    def close(self) -> None: ...


def default_gateway(table: Path = ROUTE_TABLE) -> IPv4Address:
    """The gateway of the IPv4 default route with the lowest metric."""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError as exc:
        raise NoGateway(f"cannot read {table}: {exc.strerror}") from exc
    best: tuple[int, IPv4Address] | None = None
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] != "00000000" or fields[7] != "00000000":
            continue
        flags, metric = int(fields[3], 16), int(fields[6])
        if flags & (_RTF_UP | _RTF_GATEWAY) != _RTF_UP | _RTF_GATEWAY:
            continue
        # The kernel prints the address in host (little-endian) byte order.
        gateway = IPv4Address(int.from_bytes(bytes.fromhex(fields[2]), "little"))
        if best is None or metric < best[0]:
            best = (metric, gateway)
    if best is None:
        raise NoGateway("no IPv4 default route via a gateway")
    return best[1]


def local_address(gateway: IPv4Address) -> IPv4Address:
    """The source address the kernel uses towards the gateway (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((str(gateway), 9))
        except OSError as exc:
            raise NoGateway(f"no route to the gateway {gateway}: {exc.strerror}") from exc
        return IPv4Address(sock.getsockname()[0])


def never_cancelled() -> threading.Event:
    return threading.Event()

"""NAT-PMP (RFC 6886) on the wire: requests built, answers parsed strictly. No I/O.

A NAT-PMP answer comes from the home router over UDP, i.e. from the network: every
parser here either returns a typed value or raises NatPmpError naming the field and
quoting the value, for any bytes at all (tests/unit/test_natpmp_codec.py feeds it
thousands of random ones).

    client -> gateway:5351   [0][0]                                    external address?
                             [0][1 udp|2 tcp][0 0][int port][ext port][lifetime]   map
    gateway -> client        [0][128+op][result][epoch][...]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address

PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128
RECOMMENDED_LIFETIME = 7200  # RFC 6886 3.3: two hours

_HEADER = struct.Struct("!BBHI")  # version, opcode, result, epoch
_EXTERNAL = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")


class NatPmpError(ValueError):
    """Bytes that are not the NAT-PMP answer expected: names the field and quotes the value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"NAT-PMP {field}: {value!r} {reason}")


class Result(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


@dataclass(frozen=True)
class ExternalAddress:
    epoch: int  # seconds since the gateway's port mapping table was (re)initialised
    address: IPv4Address


@dataclass(frozen=True)
class MapResult:
    protocol: str  # "udp" | "tcp"
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int  # seconds granted; 0 on a deletion


@dataclass(frozen=True)
class Refusal:
    """A well-formed answer whose result code is not SUCCESS (the gateway said no)."""

    opcode: int
    result: int
    epoch: int

    @property
    def reason(self) -> str:
        try:
            return Result(self.result).name.lower().replace("_", " ")
        except ValueError:
            return f"result code {self.result}"


Answer = ExternalAddress | MapResult | Refusal


def _port(field: str, value: int, allow_zero: bool) -> int:
    if not isinstance(value, int) or not (0 if allow_zero else 1) <= value <= 0xFFFF:
        raise NatPmpError(field, value, "is not a port number")
    return value


def _opcode_for(protocol: str) -> int:
    if protocol == "udp":
        return OP_MAP_UDP
    if protocol == "tcp":
        return OP_MAP_TCP
    raise NatPmpError("protocol", protocol, "must be 'udp' or 'tcp'")


def external_address_request() -> bytes:
    return bytes((VERSION, OP_EXTERNAL_ADDRESS))


def map_request(protocol: str, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A mapping request; lifetime 0 (with external port 0) deletes the mapping (RFC 6886 3.4)."""
    _port("internal port", internal_port, allow_zero=False)
    _port("suggested external port", external_port, allow_zero=True)
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise NatPmpError("lifetime", lifetime, "is not a 32-bit number of seconds")
    return _MAP_REQUEST.pack(VERSION, _opcode_for(protocol), 0, internal_port, external_port, lifetime)


def delete_request(protocol: str, internal_port: int) -> bytes:
    return map_request(protocol, internal_port, 0, 0)


def parse_response(data: bytes) -> Answer:
    """One datagram from the gateway -> its typed meaning, or NatPmpError."""
    if len(data) < _HEADER.size:
        raise NatPmpError("length", len(data), f"is shorter than the {_HEADER.size}-byte header")
    version, opcode, result, epoch = _HEADER.unpack_from(data)
    if version != VERSION:
        raise NatPmpError("version", version, f"is not {VERSION}")
    if not opcode & RESPONSE_BIT:
        raise NatPmpError("opcode", opcode, "is a request, not a response")
    op = opcode - RESPONSE_BIT
    if op not in (OP_EXTERNAL_ADDRESS, OP_MAP_UDP, OP_MAP_TCP):
        raise NatPmpError("opcode", opcode, "answers no request this client sends")
    if result != Result.SUCCESS:
        # Error answers may be cut short after the header (RFC 6886 3.5), so take only it.
        return Refusal(op, result, epoch)
    if op == OP_EXTERNAL_ADDRESS:
        if len(data) != _EXTERNAL.size:
            raise NatPmpError("length", len(data), f"is not {_EXTERNAL.size} for an external address answer")
        address = IPv4Address(_EXTERNAL.unpack(data)[4])
        return ExternalAddress(epoch, address)
    if len(data) != _MAP_RESPONSE.size:
        raise NatPmpError("length", len(data), f"is not {_MAP_RESPONSE.size} for a mapping answer")
    *_, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    if internal == 0:
        raise NatPmpError("internal port", internal, "is not a port number")
    if lifetime and external == 0:
        raise NatPmpError("external port", external, "is zero on a live mapping")
    return MapResult("udp" if op == OP_MAP_UDP else "tcp", epoch, internal, external, lifetime)


def epoch_lost(prev_client: float, prev_epoch: int, now_client: float, now_epoch: int) -> bool:
    """Did the gateway lose its mappings (reboot) between two answers? RFC 6886 3.6 / RFC 6887 8.5.

    The gateway's epoch counts seconds; it must never go back, and must advance at
    least about as fast as our own clock (7/8 of it, with 2 s of slack for rounding)."""
    if now_epoch < prev_epoch - 1:
        return True
    client_delta = now_client - prev_client
    server_delta = now_epoch - prev_epoch
    return server_delta + 2 < client_delta * 7 / 8

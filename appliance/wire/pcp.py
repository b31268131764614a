"""PCP (RFC 6887), the MAP and ANNOUNCE opcodes, on the wire: requests built, answers
parsed strictly. No I/O.

Every parser returns a typed value or raises PcpError naming the field and quoting
the value, for any bytes at all. A NAT-PMP-only gateway answers a PCP request with
a NAT-PMP "unsupported version" (version 0): that is PcpVersionMismatch, so the
caller can fall back to NAT-PMP at once (RFC 6887 9).

    request   [2][op][0 0][lifetime:4][client address:16]            then, for MAP, the payload
    response  [2][128+op][0][result][lifetime:4][epoch:4][0:12]      then the payload, then options
    MAP payload  [nonce:12][proto][0 0 0][internal port][external port][external address:16]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address

PORT = 5351
VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
RESPONSE_BIT = 128
NONCE_SIZE = 12
MAX_SIZE = 1100  # RFC 6887 7: no PCP message is longer
PROTOCOLS = {"udp": 17, "tcp": 6}

_REQUEST = struct.Struct("!BBHI16s")
_RESPONSE = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")
_OPTION = struct.Struct("!BBH")
_V4_MAPPED = bytes(10) + b"\xff\xff"


class PcpError(ValueError):
    """Bytes that are not the PCP answer expected: names the field and quotes the value."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"PCP {field}: {value!r} {reason}")


class PcpVersionMismatch(PcpError):
    """The gateway speaks another version (0: NAT-PMP only)."""


class Result(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


@dataclass(frozen=True)
class MapInfo:
    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPv4Address | IPv6Address


@dataclass(frozen=True)
class Response:
    opcode: int
    result: int
    lifetime: int  # granted, or (on an error) how long the error is expected to last
    epoch: int
    map: MapInfo | None  # the MAP payload; None for ANNOUNCE and for short error answers

    @property
    def ok(self) -> bool:
        return self.result == Result.SUCCESS

    @property
    def reason(self) -> str:
        try:
            return Result(self.result).name.lower().replace("_", " ")
        except ValueError:
            return f"result code {self.result}"


def encode_address(address: IPv4Address | IPv6Address) -> bytes:
    """PCP carries every address in 16 bytes, IPv4 as ::ffff:a.b.c.d (RFC 6887 5)."""
    if isinstance(address, IPv4Address):
        return _V4_MAPPED + address.packed
    return address.packed


def decode_address(raw: bytes) -> IPv4Address | IPv6Address:
    if len(raw) != 16:
        raise PcpError("address", raw, "is not 16 bytes")
    if raw.startswith(_V4_MAPPED):
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


def _request(opcode: int, lifetime: int, client: IPv4Address | IPv6Address) -> bytes:
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise PcpError("lifetime", lifetime, "is not a 32-bit number of seconds")
    return _REQUEST.pack(VERSION, opcode, 0, lifetime, encode_address(client))


def announce_request(client: IPv4Address | IPv6Address) -> bytes:
    return _request(OP_ANNOUNCE, 0, client)


def map_request(
    nonce: bytes,
    protocol: str,
    internal_port: int,
    client: IPv4Address | IPv6Address,
    lifetime: int,
    external_port: int = 0,
    external_address: IPv4Address | IPv6Address | None = None,
) -> bytes:
    """A MAP request; lifetime 0 deletes the mapping that nonce made (RFC 6887 15)."""
    if len(nonce) != NONCE_SIZE:
        raise PcpError("nonce", nonce, f"is not {NONCE_SIZE} bytes")
    if protocol not in PROTOCOLS:
        raise PcpError("protocol", protocol, "must be 'udp' or 'tcp'")
    if not 1 <= internal_port <= 0xFFFF:
        raise PcpError("internal port", internal_port, "is not a port number")
    if not 0 <= external_port <= 0xFFFF:
        raise PcpError("suggested external port", external_port, "is not a port number")
    # "No preference" is the all-zeros address of the client's family (RFC 6887 11.1).
    suggested = external_address or (IPv4Address(0) if client.version == 4 else IPv6Address(0))
    payload = _MAP.pack(nonce, PROTOCOLS[protocol], bytes(3), internal_port, external_port,
                        encode_address(suggested))  # fmt: skip
    return _request(OP_MAP, lifetime, client) + payload


def _check_options(data: bytes, offset: int) -> None:
    """Walk the options after the opcode payload: each must fit exactly (RFC 6887 7.3)."""
    while offset < len(data):
        if len(data) - offset < _OPTION.size:
            raise PcpError("option header", data[offset:], "is cut short")
        code, _, length = _OPTION.unpack_from(data, offset)
        padded = (length + 3) & ~3
        if offset + _OPTION.size + padded > len(data):
            raise PcpError(f"option {code} length", length, f"overruns the {len(data)}-byte message")
        offset += _OPTION.size + padded


def parse_response(data: bytes) -> Response:
    """One datagram from the gateway -> Response, or PcpError."""
    if len(data) < 2:
        raise PcpError("length", len(data), "is too short for any answer")
    if data[0] != VERSION:
        # A NAT-PMP-only gateway answers [0][128+op][result 1: unsupported version][epoch]
        # (RFC 6886 3.5, RFC 6887 9); anything else with another version is just garbage.
        if data[0] == 0 and len(data) >= 8 and data[1] & RESPONSE_BIT and data[2:4] == b"\x00\x01":
            raise PcpVersionMismatch("version", data[0], "is NAT-PMP's: the gateway does not speak PCP")
        raise PcpError("version", data[0], f"is not {VERSION}")
    if len(data) < _RESPONSE.size:
        raise PcpError("length", len(data), f"is shorter than the {_RESPONSE.size}-byte header")
    if len(data) > MAX_SIZE or len(data) % 4:
        raise PcpError("length", len(data), f"is not a multiple of 4 up to {MAX_SIZE}")
    _, opcode, _, result, lifetime, epoch, _ = _RESPONSE.unpack_from(data)
    if not opcode & RESPONSE_BIT:
        raise PcpError("opcode", opcode, "is a request, not a response")
    op = opcode - RESPONSE_BIT
    if op not in (OP_ANNOUNCE, OP_MAP):
        raise PcpError("opcode", opcode, "answers no request this client sends")
    offset = _RESPONSE.size
    info = None
    if op == OP_MAP:
        if len(data) < offset + _MAP.size:
            if result == Result.SUCCESS:
                raise PcpError("length", len(data), "is too short for a MAP answer")
            return Response(op, result, lifetime, epoch, None)  # an error cut short after the header
        nonce, proto, _, internal, external, raw = _MAP.unpack_from(data, offset)
        if proto not in PROTOCOLS.values():
            raise PcpError("protocol", proto, "is neither UDP nor TCP")
        if internal == 0:
            raise PcpError("internal port", internal, "is not a port number")
        if result == Result.SUCCESS and lifetime and external == 0:
            raise PcpError("assigned external port", external, "is zero on a live mapping")
        info = MapInfo(nonce, proto, internal, external, decode_address(raw))
        offset += _MAP.size
    _check_options(data, offset)
    return Response(op, result, lifetime, epoch, info)

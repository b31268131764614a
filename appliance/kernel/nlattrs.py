"""Netlink's wire format, for all of the agent's netlink (rtnl.py, conntrack.py,
wireguard_read.py, wireguard_netlink.py): one request, its answer's messages, and
their attributes, decoded only as far as the caller asks.

pyroute2 0.9 decodes every attribute of every message into objects, on an asyncio
loop per socket: with 100 peers its reads were most of the agent's CPU under
emulation and megabytes of garbage a second, and its IPRoute alone was 3.6 MB of
the agent's heap and ~70 ms of its start (issue 14).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # nlattr: length, type
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400  # for NEW requests
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # on an error answer
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
NLMSGERR_ATTR_MSG = 1
RECV_SIZE = 1 << 16  # a dump's message batch fits (the kernel fills up to 32 KiB)


def bound_socket(protocol: int, timeout: float) -> socket.socket:
    """A netlink socket of `protocol`, bound (the kernel picks its port id); raises
    OSError where the protocol is not there."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.settimeout(timeout)
        # Errors echo only the request's header, and carry the kernel's reason
        # ("Nexthop device is not up"), which ask() puts in the OSError.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


def nest(kind: int, *inner: bytes) -> bytes:
    """A nested attribute holding the `inner` attributes."""
    return attr(kind | NLA_F_NESTED, b"".join(inner))


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute in `data`; stops at one that is cut short."""
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def ask(
    sock: socket.socket, kind: int, flags: int, payload: bytes, seq: int = 1
) -> Iterator[tuple[int, bytes]]:
    """Send one request; yield (type, payload) of each message of the answer, until
    the dump is done (or, without NLM_F_DUMP, the one answer came, or with NLM_F_ACK
    the acknowledgement). An error the kernel answers with is raised as OSError
    with its errno, and its own explanation as the text when it gives one."""
    sock.send(HEADER.pack(HEADER.size + len(payload), kind, NLM_F_REQUEST | flags, seq, 0) + payload)
    while True:
        data = sock.recv(RECV_SIZE)
        offset = 0
        while offset + HEADER.size <= len(data):
            length, msg_type, msg_flags, msg_seq, _port = HEADER.unpack_from(data, offset)
            if length < HEADER.size or offset + length > len(data):
                raise ValueError(f"netlink message of length {length} at {offset} of {len(data)} bytes")
            body = data[offset + HEADER.size : offset + length]
            offset += (length + 3) & ~3
            if msg_seq != seq:
                continue  # not ours (a late answer to an earlier request)
            if msg_type == NLMSG_DONE:
                return
            if msg_type == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", body)
                if code:
                    raise OSError(-code, _reason(body, msg_flags) or os.strerror(-code))
                return  # an acknowledgement
            yield msg_type, body
            if not flags & NLM_F_DUMP:
                return


def acknowledged(sock: socket.socket, kind: int, flags: int, payload: bytes, seq: int) -> None:
    """Send a request that changes something and wait for the kernel's
    acknowledgement (OSError as ask() raises it when the kernel refuses)."""
    for _ in ask(sock, kind, NLM_F_ACK | flags, payload, seq):
        pass


def _reason(body: bytes, flags: int) -> str:
    """The kernel's extended-ack text in an error answer's body ("" if none)."""
    if not flags & NLM_F_ACK_TLVS or len(body) < 4 + HEADER.size:
        return ""
    echoed = HEADER.size if flags & NLM_F_CAPPED else HEADER.unpack_from(body, 4)[0]
    for kind, value in attrs(body[4 + ((echoed + 3) & ~3) :]):
        if kind == NLMSGERR_ATTR_MSG:
            return value.split(b"\0", 1)[0].decode(errors="replace")
    return ""

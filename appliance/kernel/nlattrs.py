"""Netlink's wire format, for the reads made without pyroute2 (conntrack.py,
wireguard_read.py): one request, its answer's messages, and their attributes,
decoded only as far as the caller asks.

Those reads run every second or on every dashboard poll. pyroute2 decodes every
attribute of every message into objects, on an asyncio loop per socket: with 100
peers that was most of the agent's CPU under emulation, and megabytes of garbage a
second (issue 14). Writes stay with pyroute2 (netlink.py, wireguard_netlink.py).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_ATTR = struct.Struct("=HH")  # nlattr: length, type
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
RECV_SIZE = 1 << 16  # a dump's message batch fits (the kernel fills up to 32 KiB)


def bound_socket(protocol: int, timeout: float) -> socket.socket:
    """A netlink socket of `protocol`, bound (the kernel picks its port id); raises
    OSError where the protocol is not there."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.settimeout(timeout)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = _ATTR.pack(_ATTR.size + len(value), kind) + value
    return raw + bytes(-len(raw) % 4)


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
    the dump is done (or, without NLM_F_DUMP, the one answer came). An error the
    kernel answers with is raised as OSError with its errno."""
    sock.send(HEADER.pack(HEADER.size + len(payload), kind, NLM_F_REQUEST | flags, seq, 0) + payload)
    while True:
        data = sock.recv(RECV_SIZE)
        offset = 0
        while offset + HEADER.size <= len(data):
            length, msg_type, _flags, msg_seq, _port = HEADER.unpack_from(data, offset)
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
                    raise OSError(-code, os.strerror(-code))
                return  # an acknowledgement
            yield msg_type, body
            if not flags & NLM_F_DUMP:
                return

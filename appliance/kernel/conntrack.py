"""The kernel's connection tracking, read only: which flows pass through this host.

Used for one question: who uses this node as exit node? A flow tracked with an
original source in the mesh and a destination outside the mesh and every private
range went out to the internet through here (agent/localapi/connected.py). The
netmap cannot tell: a peer's choice of exit node is its own and not announced.

The dump is read straight off a NETLINK_NETFILTER socket, and of each flow only
the original tuple's two addresses are decoded. pyroute2's Conntrack decoded every
attribute of every flow into objects: with the ~300 flows of 100 peers that never
answer, one read took 0.3 s and 5 MB on this host and 30-50 s under the image
tier's emulation, and it is asked for by every status the dashboard polls.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

from appliance.base.net import IPAddress

log = logging.getLogger(__name__)

MAX_FLOWS = 65536  # a Pi's conntrack table holds fewer; a bound on one read's cost
TIMEOUT_S = 5.0

NETLINK_NETFILTER = 12
# nfnetlink: subsystem ctnetlink (1) << 8 | IPCTNL_MSG_CT_GET (1); flows come back as CT_NEW (0)
CT_GET = 1 << 8 | 1
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
CTA_TUPLE_ORIG, CTA_TUPLE_IP = 1, 1
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ATTR = struct.Struct("=HH")  # nlattr: len, type
_NFGENMSG = 4


def flows() -> list[tuple[IPAddress, IPAddress]]:
    """(original source, original destination) of every tracked flow, v4 and v6.
    Empty where conntrack is not there (no module: nothing was ever NATed)."""
    found: list[tuple[IPAddress, IPAddress]] = []
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        log.debug("conntrack not readable: %s", e)
        return found
    with sock:
        sock.settimeout(TIMEOUT_S)
        try:
            sock.bind((0, 0))
            # nfgenmsg: AF_UNSPEC (every l3 protocol), NFNETLINK_V0, res_id 0
            request = _HEADER.pack(_HEADER.size + _NFGENMSG, CT_GET, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
            sock.send(request + bytes(_NFGENMSG))
            for flow in _dump(sock):
                found.append(flow)
                if len(found) >= MAX_FLOWS:
                    break
        except (OSError, ValueError) as e:
            log.debug("conntrack dump failed: %s", e)
    return found


def _dump(sock: socket.socket) -> Iterator[tuple[IPAddress, IPAddress]]:
    while True:
        data = sock.recv(1 << 16)
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                raise ValueError(f"netlink message of length {length} at {offset} of {len(data)}")
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                if code:
                    raise OSError(-code, f"ctnetlink dump: {os.strerror(-code)}")
            else:
                flow = parse_flow(data[offset + _HEADER.size + _NFGENMSG : offset + length])
                if flow is not None:
                    yield flow
            offset += (length + 3) & ~3


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def parse_flow(attrs: bytes) -> tuple[IPAddress, IPAddress] | None:
    """The original tuple's (source, destination) of one ctnetlink flow's attributes;
    None when it has no addresses (a flow of another l3 protocol)."""
    for kind, value in _attrs(attrs):
        if kind != CTA_TUPLE_ORIG:
            continue
        for inner, ip in _attrs(value):
            if inner != CTA_TUPLE_IP:
                continue
            addrs = dict(_attrs(ip))
            v4 = addrs.get(CTA_IP_V4_SRC, b""), addrs.get(CTA_IP_V4_DST, b"")
            if len(v4[0]) == len(v4[1]) == 4:
                return IPv4Address(v4[0]), IPv4Address(v4[1])
            v6 = addrs.get(CTA_IP_V6_SRC, b""), addrs.get(CTA_IP_V6_DST, b"")
            if len(v6[0]) == len(v6[1]) == 16:
                return IPv6Address(v6[0]), IPv6Address(v6[1])
        return None
    return None

"""The kernel's connection tracking, read only: which flows pass through this host.

Used for one question: who uses this node as exit node? A flow tracked with an
original source in the mesh and a destination outside the mesh and every private
range went out to the internet through here (agent/localapi/connected.py). The
netmap cannot tell: a peer's choice of exit node is its own and not announced.

The dump is read straight off a NETLINK_NETFILTER socket (nlattrs.py), and of each
flow only the original tuple's two addresses are decoded. pyroute2's Conntrack decoded every
attribute of every flow into objects: with the ~300 flows of 100 peers that never
answer, one read took 0.3 s and 5 MB on this host and 30-50 s under the image
tier's emulation, and it is asked for by every status the dashboard polls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

from appliance.base.net import IPAddress
from appliance.kernel.nlattrs import NLM_F_DUMP, ask, attrs, bound_socket

log = logging.getLogger(__name__)

MAX_FLOWS = 65536  # a Pi's conntrack table holds fewer; a bound on one read's cost
TIMEOUT_S = 5.0

NETLINK_NETFILTER = 12
# nfnetlink: subsystem ctnetlink (1) << 8 | IPCTNL_MSG_CT_GET (1); flows come back as CT_NEW (0)
CT_GET = 1 << 8 | 1
CTA_TUPLE_ORIG, CTA_TUPLE_IP = 1, 1
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
_NFGENMSG = 4  # family (AF_UNSPEC: every l3 protocol), version, resource id


def flows() -> list[tuple[IPAddress, IPAddress]]:
    """(original source, original destination) of every tracked flow, v4 and v6.
    Empty where conntrack is not there (no module: nothing was ever NATed)."""
    found: list[tuple[IPAddress, IPAddress]] = []
    try:
        sock = bound_socket(NETLINK_NETFILTER, TIMEOUT_S)
    except OSError as e:
        log.debug("conntrack not readable: %s", e)
        return found
    with sock:
        try:
            for flow in _flows(ask(sock, CT_GET, NLM_F_DUMP, bytes(_NFGENMSG))):
                found.append(flow)
                if len(found) >= MAX_FLOWS:
                    break
        except (OSError, ValueError) as e:
            log.debug("conntrack dump failed: %s", e)
    return found


def _flows(messages: Iterator[tuple[int, bytes]]) -> Iterator[tuple[IPAddress, IPAddress]]:
    for _kind, body in messages:
        flow = parse_flow(body[_NFGENMSG:])
        if flow is not None:
            yield flow


def parse_flow(data: bytes) -> tuple[IPAddress, IPAddress] | None:
    """The original tuple's (source, destination) of one ctnetlink flow's attributes;
    None when it has no addresses (a flow of another l3 protocol)."""
    for kind, value in attrs(data):
        if kind != CTA_TUPLE_ORIG:
            continue
        for inner, ip in attrs(value):
            if inner != CTA_TUPLE_IP:
                continue
            addrs = dict(attrs(ip))
            v4 = addrs.get(CTA_IP_V4_SRC, b""), addrs.get(CTA_IP_V4_DST, b"")
            if len(v4[0]) == len(v4[1]) == 4:
                return IPv4Address(v4[0]), IPv4Address(v4[1])
            v6 = addrs.get(CTA_IP_V6_SRC, b""), addrs.get(CTA_IP_V6_DST, b"")
            if len(v6[0]) == len(v6[1]) == 16:
                return IPv6Address(v6[0]), IPv6Address(v6[1])
        return None
    return None

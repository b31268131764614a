"""rtnetlink, the kernel's interface for links, addresses, routes and rules, on one
plain synchronous socket (nlattrs.py's wire format).

This replaces pyroute2 0.9's IPRoute in the agent: IPRoute runs an asyncio loop
per socket and imports ~140 modules (unittest.mock, multiprocessing, a plugin for
every link kind), 3.6 MB of the agent's heap and ~70 ms of its start, ~2 s under
qemu (issue 14), for the dozen kinds of request meshpi makes. Only the fields
meshpi reads or writes are decoded; the messages are linux/rtnetlink.h's,
linux/if_link.h's, linux/if_addr.h's and linux/fib_rules.h's.
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType

from appliance.kernel.nlattrs import (
    NLM_F_DUMP,
    acknowledged,
    ask,
    attr,
    attrs,
    bound_socket,
    nest,
)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
# fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
FIBRULE = struct.Struct("=BBBBBBBBI")
RTNEXTHOP = struct.Struct("=HBBi")  # rtnexthop: length, flags, hops, ifindex

IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 4, 18, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_MULTIPATH, RTA_TABLE = 1, 4, 9, 15
FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 1, 2, 6, 10, 15, 16
FRA_SUPPRESS_IFGROUP, FRA_SUPPRESS_PREFIXLEN, FRA_PAD, FRA_PROTOCOL = 13, 14, 18, 21
IFF_UP = 0x1
TIMEOUT_S = 5.0


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _text(value: str) -> bytes:
    return value.encode() + b"\0"


def _decode_text(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mtu: int | None
    kind: str | None  # IFLA_INFO_KIND ("wireguard", "veth"...), None for a plain device


@dataclass(frozen=True)
class Address:
    index: int
    family: int
    prefixlen: int
    address: bytes  # IFA_LOCAL where there is one (v4: the own end), else IFA_ADDRESS


@dataclass(frozen=True)
class RouteEntry:
    family: int
    dst_len: int
    table: int  # RTA_TABLE (the header's byte says 252 above 255)
    protocol: int
    scope: int
    type: int
    dst: bytes | None  # None: the default route
    oif: int | None
    hops: tuple[int, ...] = ()  # the interfaces of a multipath route


@dataclass(frozen=True)
class RuleEntry:
    family: int
    dst_len: int
    src_len: int
    tos: int
    table: int  # FRA_TABLE where given, else the header's
    action: int
    flags: int
    attrs: Mapping[int, bytes]


def parse_link(body: bytes) -> Link:
    _family, _type, index, _flags, _change = IFINFO.unpack_from(body)
    found = dict(attrs(body[IFINFO.size :]))
    kind = None
    if IFLA_LINKINFO in found:
        raw = dict(attrs(found[IFLA_LINKINFO])).get(IFLA_INFO_KIND)
        kind = None if raw is None else _decode_text(raw)
    mtu = found.get(IFLA_MTU)
    return Link(index, _decode_text(found.get(IFLA_IFNAME, b"")),
                None if mtu is None else struct.unpack("=I", mtu)[0], kind)  # fmt: skip


def parse_address(body: bytes) -> Address | None:
    family, prefixlen, _flags, _scope, index = IFADDR.unpack_from(body)
    found = dict(attrs(body[IFADDR.size :]))
    address = found.get(IFA_LOCAL) or found.get(IFA_ADDRESS)
    return None if address is None else Address(index, family, prefixlen, address)


def parse_route(body: bytes) -> RouteEntry:
    family, dst_len, _src, _tos, table, protocol, scope, kind, _flags = RTMSG.unpack_from(body)
    found = dict(attrs(body[RTMSG.size :]))
    if RTA_TABLE in found:
        table = struct.unpack("=I", found[RTA_TABLE])[0]
    oif = found.get(RTA_OIF)
    return RouteEntry(family, dst_len, table, protocol, scope, kind, found.get(RTA_DST),
                      None if oif is None else struct.unpack("=i", oif)[0],
                      tuple(_hops(found.get(RTA_MULTIPATH, b""))))  # fmt: skip


def _hops(data: bytes) -> Iterator[int]:
    offset = 0
    while offset + RTNEXTHOP.size <= len(data):
        length, _flags, _hops, index = RTNEXTHOP.unpack_from(data, offset)
        if length < RTNEXTHOP.size:
            return
        yield index
        offset += (length + 3) & ~3


def parse_fib_rule(body: bytes) -> RuleEntry:
    family, dst_len, src_len, tos, table, _r1, _r2, action, flags = FIBRULE.unpack_from(body)
    found = dict(attrs(body[FIBRULE.size :]))
    if FRA_TABLE in found:
        table = struct.unpack("=I", found[FRA_TABLE])[0]
    return RuleEntry(family, dst_len, src_len, tos, table, action, flags, found)


# -- requests (pure: bytes for the socket) ------------------------------------------


def link_request(index: int = 0, name: str | None = None, mtu: int | None = None,
                 up: bool = False, kind: str | None = None) -> bytes:  # fmt: skip
    """An ifinfomsg naming a link by index (or by name, index 0) with what to set."""
    body = IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)
    if name is not None:
        body += attr(IFLA_IFNAME, _text(name))
    if mtu is not None:
        body += attr(IFLA_MTU, _u32(mtu))
    if kind is not None:
        body += nest(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _text(kind)))
    return body


def address_request(index: int, family: int, address: bytes, prefixlen: int, flags: int = 0) -> bytes:
    """What `ip address add|del` sends: IPv4 carries the address as IFA_LOCAL too."""
    body = IFADDR.pack(family, prefixlen, flags, 0, index) + attr(IFA_ADDRESS, address)
    if family == socket.AF_INET:
        body += attr(IFA_LOCAL, address)
    return body


def route_request(family: int, dst: bytes, dst_len: int, table: int, oif: int, *,
                  protocol: int, scope: int, kind: int) -> bytes:  # fmt: skip
    body = RTMSG.pack(family, dst_len, 0, 0, _header_table(table), protocol, scope, kind, 0)
    if dst_len:
        body += attr(RTA_DST, dst)
    return body + attr(RTA_OIF, struct.pack("=i", oif)) + attr(RTA_TABLE, _u32(table))


def rule_request(family: int, priority: int, table: int, action: int, flags: int, *,
                 fwmark: tuple[int, int] | None = None, dst: tuple[bytes, int] | None = None,
                 suppress_prefixlen: int | None = None) -> bytes:  # fmt: skip
    body = FIBRULE.pack(family, dst[1] if dst else 0, 0, 0, _header_table(table), 0, 0, action, flags)
    body += attr(FRA_PRIORITY, _u32(priority)) + attr(FRA_TABLE, _u32(table))
    if fwmark is not None:
        body += attr(FRA_FWMARK, _u32(fwmark[0])) + attr(FRA_FWMASK, _u32(fwmark[1]))
    if dst is not None:
        body += attr(FRA_DST, dst[0])
    if suppress_prefixlen is not None:
        body += attr(FRA_SUPPRESS_PREFIXLEN, _u32(suppress_prefixlen))
    return body


def _header_table(table: int) -> int:
    """The header's byte: RT_TABLE_COMPAT (252) above 255, where the attribute says which."""
    return table if table < 256 else 252


# -- the socket -----------------------------------------------------------------------


class Rtnl:
    """One rtnetlink socket in the network namespace of the thread that opened it.
    Errors are OSError with the kernel's errno (and its extended-ack text). One
    request at a time: a thread must not read another's answer."""

    def __init__(self, timeout: float = TIMEOUT_S) -> None:
        self._sock = bound_socket(socket.NETLINK_ROUTE, timeout)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        self._sock.close()

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        with self._lock:
            return [b for _t, b in ask(self._sock, kind, NLM_F_DUMP, body, seq=next(self._seq))]

    def get(self, kind: int, body: bytes) -> bytes:
        with self._lock:
            for _t, answer in ask(self._sock, kind, 0, body, seq=next(self._seq)):
                return answer
        raise OSError(0, "the kernel gave no answer")

    def change(self, kind: int, flags: int, body: bytes) -> None:
        """A NEW or DEL request, acknowledged."""
        with self._lock:
            acknowledged(self._sock, kind, flags, body, next(self._seq))

    # -- the reads meshpi makes ---------------------------------------------------

    def link(self, name: str) -> Link:
        """OSError ENODEV when there is no such link."""
        return parse_link(self.get(RTM_GETLINK, link_request(name=name)))

    def links(self) -> list[Link]:
        return [parse_link(b) for b in self.dump(RTM_GETLINK, link_request())]

    def addresses(self, family: int = socket.AF_UNSPEC) -> list[Address]:
        found = (parse_address(b) for b in self.dump(RTM_GETADDR, IFADDR.pack(family, 0, 0, 0, 0)))
        return [a for a in found if a is not None]

    def routes(self, family: int) -> list[RouteEntry]:
        return [parse_route(b) for b in self.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))]

    def rules(self, family: int) -> list[RuleEntry]:
        request = FIBRULE.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return [parse_fib_rule(b) for b in self.dump(RTM_GETRULE, request)]

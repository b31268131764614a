"""Notice the host's networks changing (a laptop roaming, a cable pulled, DHCP
handing out another lease) through rtnetlink multicast, and tell the loop.

A thread listens on one NETLINK_ROUTE socket bound to the link, address and
route groups (no polling: it sleeps in select() until the kernel says something).
Events meshpi causes itself are dropped here, so an apply never wakes the next one:
anything on meshpi's own interface (its addresses, its routes, the link itself)
and anything in meshpi's routing table. Of link events only a change of name or
of the up/running flags counts: a Wi-Fi driver repeats RTM_NEWLINK on every scan.

A burst (an interface going down takes its addresses and routes with it) is
gathered for at most COALESCE seconds from its first event and handed to the bus
as one `HostChanged`; the loop re-plans from freshly read host facts
(`System.facts`), which re-checks the route conflicts and the exit node's LAN
rules against the new networks.

The socket is parsed by hand (struct, a few attributes): four message layouts,
and the thread keeps its own socket, apart from the loop's (kernel/rtnl.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from appliance.agent.bus import Bus, HostChanged

log = logging.getLogger(__name__)

COALESCE = 0.2  # seconds a burst is gathered before the loop hears of it
SUMMARY_ITEMS = 4  # events named in the log line; the rest are counted

# linux/rtnetlink.h
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 16, 17, 20, 21, 24, 25
RTM_GETLINK, NLMSG_DONE, NLMSG_ERROR = 18, 3, 2
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFLA_IFNAME, IFA_ADDRESS, IFA_LOCAL, RTA_DST, RTA_OIF, RTA_TABLE = 3, 1, 2, 1, 4, 15
RTM_F_CLONED = 0x200  # a route-cache entry, not a route anyone configured
RT_TABLE_LOCAL = 255  # follows the addresses, which are watched themselves
IFF_UP, IFF_RUNNING, IFF_LOWER_UP = 0x1, 0x40, 0x10000
LINK_FLAGS = IFF_UP | IFF_RUNNING | IFF_LOWER_UP

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Event:
    """One rtnetlink message, reduced to what decides whether it is ours."""

    kind: str  # "link", "address", "route"
    added: bool
    index: int  # ifindex (the route's output interface; 0 if it has none)
    name: str | None = None  # links only
    flags: int = 0  # links only
    table: int = 0  # routes only
    detail: str = ""  # an address or a destination, for the log line


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _address(family: int, raw: bytes, prefix: int) -> str:
    fam = socket.AF_INET if family == socket.AF_INET else socket.AF_INET6
    try:
        return f"{socket.inet_ntop(fam, raw)}/{prefix}"
    except ValueError:
        return "?"


def parse(data: bytes) -> Iterator[Event]:
    """The events in one datagram from the socket; unknown types are skipped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return  # cut short: nothing after it can be trusted
        body = offset + _NLMSGHDR.size
        end = offset + length
        msg = data[:end]
        offset += (length + 3) & ~3
        if kind in (RTM_NEWLINK, RTM_DELLINK) and end - body >= _IFINFOMSG.size:
            _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(msg, body)
            attrs = dict(_attrs(msg, body + _IFINFOMSG.size))
            name = attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace") or None
            yield Event("link", kind == RTM_NEWLINK, index, name=name, flags=flags & LINK_FLAGS)
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and end - body >= _IFADDRMSG.size:
            family, prefix, _f, _scope, index = _IFADDRMSG.unpack_from(msg, body)
            attrs = dict(_attrs(msg, body + _IFADDRMSG.size))
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS) or b""
            yield Event("address", kind == RTM_NEWADDR, index, detail=_address(family, raw, prefix))
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and end - body >= _RTMSG.size:
            family, dst_len, _s, _tos, table, _proto, _scope, _type, flags = _RTMSG.unpack_from(msg, body)
            if flags & RTM_F_CLONED:
                continue
            attrs = dict(_attrs(msg, body + _RTMSG.size))
            if RTA_TABLE in attrs and len(attrs[RTA_TABLE]) == 4:
                table = struct.unpack("=I", attrs[RTA_TABLE])[0]
            oif = struct.unpack("=i", attrs[RTA_OIF])[0] if len(attrs.get(RTA_OIF, b"")) == 4 else 0
            dst = _address(family, attrs[RTA_DST], dst_len) if RTA_DST in attrs else "default"
            yield Event("route", kind == RTM_NEWROUTE, oif, table=table, detail=dst)


class NetWatch(threading.Thread):
    """`ours()` names meshpi's interface and table right now (prefs can move
    them); read on this thread, so it must be cheap and thread-safe."""

    def __init__(self, bus: Bus, ours: Callable[[], tuple[str, int]]) -> None:
        super().__init__(name="meshpi-netwatch", daemon=True)
        self.bus, self.ours = bus, ours
        self.sock = _rtnetlink()
        # A burst of thousands of routes must not overflow the socket; if it does
        # anyway (ENOBUFS), that itself counts as a change.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, GROUPS))
        self.links = links_now()  # ifindex -> (name, flags) as last seen
        # Addresses an RTM_NEWADDR already told of: IPv6 repeats it for every
        # router advertisement that refreshes a lifetime (a few a minute, on some
        # networks), which changes nothing the plan reads.
        self.addresses: set[tuple[int, str]] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        try:
            os.write(self._wake_w, b"!")
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.EAGAIN):
                raise

    def _ifname(self, index: int) -> str:
        known = self.links.get(index)
        if known is not None:
            return known[0]
        try:
            return socket.if_indextoname(index)
        except OSError:
            return f"if{index}"

    def describe(self, event: Event) -> str | None:
        """What changed, in words for the log; None if it is meshpi's own or no change."""
        interface, table = self.ours()
        if event.kind == "link":
            before = self.links.get(event.index)
            name = event.name or (before[0] if before else f"if{event.index}")
            if not event.added:
                self.links.pop(event.index, None)
                return None if name == interface else f"{name} removed"
            self.links[event.index] = (name, event.flags)
            if name == interface:
                return None
            if before is None:
                return f"{name} appeared"
            if before[0] != name:
                return f"{before[0]} renamed {name}"
            if before[1] == event.flags:
                return None  # a Wi-Fi scan, statistics: nothing the plan depends on
            return f"{name} {'up' if event.flags & IFF_RUNNING else 'down'}"
        name = self._ifname(event.index)
        if event.kind == "address":
            known = (event.index, event.detail)
            if event.added and known in self.addresses:
                return None
            (self.addresses.add if event.added else self.addresses.discard)(known)
        if name == interface or (event.kind == "route" and event.table in (table, RT_TABLE_LOCAL)):
            return None
        verb = "added" if event.added else "removed"
        where = f" on {name}" if event.index else ""
        return f"{event.kind} {event.detail} {verb}{where}"

    def _read(self) -> list[str]:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return []
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return ["netlink overflowed (a large burst)"]
            raise
        return [d for d in map(self.describe, parse(data)) if d is not None]

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # the data plane goes on without it; the resync still catches up
            log.exception("watching the host's networks failed; changes are seen at the next resync")
        finally:
            self.sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        self.sock.setblocking(False)
        pending: list[str] = []
        first = 0.0
        while not self._stopping.is_set():
            timeout = None if not pending else max(first + COALESCE - time.monotonic(), 0.0)
            ready, _, _ = select.select([self.sock.fileno(), self._wake_r], [], [], timeout)
            if self._wake_r in ready:
                return
            if self.sock.fileno() in ready:
                found = self._read()
                if found and not pending:
                    first = time.monotonic()
                pending += found
            if pending and time.monotonic() >= first + COALESCE:
                self.bus.put(HostChanged(summary(pending), first))
                pending = []


def _rtnetlink() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)


def links_now() -> dict[int, tuple[str, int]]:
    """Every link's name and up/running flags (one RTM_GETLINK dump), so that the
    first change of a flag is told from a repeat."""
    found: dict[int, tuple[str, int]] = {}
    with _rtnetlink() as s:
        request = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(header + request)
        while True:
            data = s.recv(1 << 16)
            for event in parse(data):
                if event.name is not None:
                    found[event.index] = (event.name, event.flags)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
                if kind in (NLMSG_DONE, NLMSG_ERROR) or length < _NLMSGHDR.size:
                    return found
                offset += (length + 3) & ~3


def summary(changes: list[str]) -> str:
    unique = list(dict.fromkeys(changes))
    shown = ", ".join(unique[:SUMMARY_ITEMS])
    return shown if len(unique) <= SUMMARY_ITEMS else f"{shown} and {len(unique) - SUMMARY_ITEMS} more"

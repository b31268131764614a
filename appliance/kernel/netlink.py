"""Links, addresses, routes and rules through rtnetlink (rtnl.py's socket).

The reconciler diffs what `routes()` and `rules()` read against what the planner
wants, so reading back must give objects *equal* to the ones that were added.
Everything that cannot be expressed as a `Route` or `Rule` is left out on read.
The messages' fields and the kernel's constants are netlink_msgs.py.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address
from socket import AF_INET, AF_INET6
from types import TracebackType

from appliance.base.net import IPInterface, IPNetwork
from appliance.core.model import MAIN_TABLE, RULE_PRIORITIES, Connected, Route, Rule, Scope
from appliance.kernel.base import InterfaceNotFound, KernelError, PermissionDenied
from appliance.kernel.netlink_msgs import (
    IFA_F_NODAD,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RTN_UNICAST,
    RTPROT_KERNEL,
    RTPROT_STATIC,
    address_request_for,
    net_of,
    parse_rule,
    route_request_for,
    rule_request_for,
)
from appliance.kernel.nlattrs import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
from appliance.kernel.rtnl import (
    FRA_PRIORITY,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    Link,
    RouteEntry,
    Rtnl,
    link_request,
)

log = logging.getLogger(__name__)

# "Already there" on add and "already gone" on remove are the contract's no-ops.
_ADD_OK = frozenset({errno.EEXIST})
_REMOVE_OK = frozenset({errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV})

DISCARD_PORT = 9  # RFC 863: the peer throws the probe away
_OUR_PRIORITIES = frozenset(struct.pack("=I", p) for p in RULE_PRIORITIES)


def _error(what: str, code: int, message: str) -> KernelError:
    text = f"{what}: {message or os.strerror(code)}"
    if code == errno.ENODEV:
        return InterfaceNotFound(text)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(text)
    return KernelError(text)


@contextmanager
def _netlink(what: str, ok: frozenset[int] = frozenset()) -> Iterator[None]:
    """Turn netlink errors into KernelErrors that name `what`; swallow `ok` codes."""
    try:
        yield
    except OSError as exc:  # the kernel's errno, with its own explanation when it gave one
        if exc.errno in ok:
            log.debug("%s: %s (nothing to do)", what, os.strerror(exc.errno or 0))
            return
        raise _error(what, exc.errno or 0, exc.strerror or "") from exc


class NetlinkLinks:
    """`Links` on the running kernel. One netlink socket, opened on first use in
    the network namespace the caller is in at that moment."""

    def __init__(self) -> None:
        self._rtnl: Rtnl | None = None

    def __enter__(self) -> NetlinkLinks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    @property
    def _ip(self) -> Rtnl:
        if self._rtnl is None:
            with _netlink("open netlink socket"):
                self._rtnl = Rtnl()
        return self._rtnl

    # -- links ---------------------------------------------------------------

    def _link(self, ifname: str) -> Link | None:
        try:
            with _netlink(f"look up interface {ifname}"):
                return self._ip.link(ifname)
        except InterfaceNotFound:
            pass
        return None

    def _index(self, ifname: str, what: str) -> int:
        link = self._link(ifname)
        if link is None:
            raise InterfaceNotFound(f"{what}: no such interface {ifname}")
        return link.index

    def _names(self) -> Mapping[int, str]:
        with _netlink("list interfaces"):
            return {link.index: link.name for link in self._ip.links()}

    def exists(self, ifname: str) -> bool:
        return self._link(ifname) is not None

    def mtu(self, ifname: str) -> int | None:
        link = self._link(ifname)
        return None if link is None else link.mtu

    def set_mtu_up(self, ifname: str, mtu: int) -> None:
        what = f"set {ifname} mtu {mtu} up"
        index = self._index(ifname, what)
        with _netlink(what):
            self._ip.change(RTM_NEWLINK, 0, link_request(index, mtu=mtu, up=True))

    def delete_link(self, ifname: str) -> None:
        link = self._link(ifname)
        if link is None:
            return
        with _netlink(f"delete interface {ifname}", ok=frozenset({errno.ENODEV})):
            self._ip.change(RTM_DELLINK, 0, link_request(link.index))

    # -- addresses -----------------------------------------------------------

    def addresses(self, ifname: str) -> frozenset[IPInterface]:
        """Addresses on `ifname`, without the IPv6 link-local ones the kernel
        makes by itself (meshpi never assigns those)."""
        what = f"list addresses on {ifname}"
        index = self._index(ifname, what)
        found: set[IPInterface] = set()
        with _netlink(what):
            # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            # point-to-point links); rtnl.py's Address takes it where there is one.
            for a in self._ip.addresses():
                if a.index != index:
                    continue
                if a.family == AF_INET:
                    found.add(IPv4Interface((ip_address(a.address), a.prefixlen)))
                elif a.family == AF_INET6:
                    v6 = IPv6Interface((ip_address(a.address), a.prefixlen))
                    if not v6.is_link_local:
                        found.add(v6)
        return frozenset(found)

    def add_address(self, ifname: str, address: IPInterface) -> None:
        what = f"add address {address} dev {ifname}"
        index = self._index(ifname, what)
        # IPv6: no duplicate address detection: usable at once, not "tentative"
        # for a second or two (a mesh address is unique by construction).
        flags = IFA_F_NODAD if address.version == 6 else 0
        request = address_request_for(index, address, flags)
        with _netlink(what, ok=_ADD_OK):
            self._ip.change(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, request)

    def remove_address(self, ifname: str, address: IPInterface) -> None:
        link = self._link(ifname)
        if link is None:  # the interface took its addresses with it
            return
        what = f"remove address {address} dev {ifname}"
        request = address_request_for(link.index, address)
        with _netlink(what, ok=_REMOVE_OK):
            self._ip.change(RTM_DELADDR, 0, request)

    # -- routes --------------------------------------------------------------

    def _unicast_routes(self) -> Iterator[tuple[RouteEntry, IPNetwork]]:
        for family in (AF_INET, AF_INET6):
            with _netlink("list routes"):
                entries = self._ip.routes(family)
            for entry in entries:
                if entry.type == RTN_UNICAST:
                    yield entry, net_of(entry.dst, entry.dst_len, family)

    def routes(self, scope: Scope) -> frozenset[Route]:
        names = self._names()
        found: set[Route] = set()
        for entry, dst in self._unicast_routes():
            table = entry.table
            dev = None if entry.oif is None else names.get(entry.oif)
            if dev is None:  # multipath or no device: not a Route we could make
                continue
            mine = table == scope.table or (
                table == MAIN_TABLE and dev == scope.interface and entry.protocol == RTPROT_STATIC
            )
            if mine:
                found.add(Route(dst, dev, table))
        return frozenset(found)

    def add_route(self, route: Route) -> None:
        what = f"add route {route}"
        index = self._index(route.dev, what)
        request = route_request_for(
            route,
            index,
            protocol=RTPROT_STATIC,  # how routes() tells ours from the rest
            # What `ip route add ... dev X` does for an IPv4 route without a gateway.
            scope=RT_SCOPE_LINK if route.dst.version == 4 else 0,
            kind=RTN_UNICAST,
        )
        with _netlink(what):
            try:
                self._ip.change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, request)
                return
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        # "File exists" is a no-op only when the route there goes out the same interface.
        holder = self._route_holder(route)
        if holder is None or holder == index:
            return
        if route.table == MAIN_TABLE:  # someone else's route: never taken over
            other = self._names().get(holder, f"index {holder}")
            raise KernelError(f"{what}: the main table already routes {route.dst} through {other}")
        with _netlink(f"replace route {route}"):  # meshpi's own table: what is there is a leftover
            self._ip.change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, request)

    def _route_holder(self, route: Route) -> int | None:
        """The interface index of the unicast route to exactly route.dst in its table (None: none)."""
        for entry, dst in self._unicast_routes():
            if dst == route.dst and entry.table == route.table:
                return entry.oif or 0
        return None

    def remove_route(self, route: Route) -> None:
        link = self._link(route.dev)
        if link is None:  # routes leave with their interface
            return
        # Any scope, as `ip route del` asks: an IPv4 delete otherwise matches only
        # scope-universe routes, and ESRCH would pass for "already gone".
        request = route_request_for(route, link.index, protocol=0, scope=RT_SCOPE_NOWHERE, kind=RTN_UNICAST)
        with _netlink(f"remove route {route}", ok=_REMOVE_OK):
            self._ip.change(RTM_DELROUTE, 0, request)

    # -- rules ---------------------------------------------------------------

    def _rules(self) -> frozenset[Rule]:
        found: set[Rule] = set()
        for family in (AF_INET, AF_INET6):
            with _netlink("list rules"):
                entries = self._ip.rules(family)
            for entry in entries:
                rule = parse_rule(entry)
                if rule is not None:
                    found.add(rule)
                elif entry.attrs.get(FRA_PRIORITY) in _OUR_PRIORITIES:
                    log.debug("ignoring rule %s: not expressible as a Rule", entry)
        return frozenset(found)

    def rules(self, scope: Scope) -> frozenset[Rule]:
        return frozenset(r for r in self._rules() if r.priority in RULE_PRIORITIES)

    def add_rule(self, rule: Rule) -> None:
        with _netlink(f"add rule {rule}", ok=_ADD_OK):
            self._ip.change(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, rule_request_for(rule))

    def remove_rule(self, rule: Rule) -> None:
        # The kernel deletes the first rule matching the attributes *given*
        # (and ignores the invert flag), so a rule that is already gone could
        # take a similar one with it. Delete only what is really there.
        if rule not in self._rules():
            log.debug("remove rule %s: not there", rule)
            return
        with _netlink(f"remove rule {rule}", ok=_REMOVE_OK):
            self._ip.change(RTM_DELRULE, 0, rule_request_for(rule))

    # -- host facts ----------------------------------------------------------

    def connected(self, exclude: str) -> tuple[Connected, ...]:
        names = self._names()
        found: set[Connected] = set()
        for entry, dst in self._unicast_routes():
            if entry.table != MAIN_TABLE or entry.protocol != RTPROT_KERNEL:
                continue
            # v4 prefix routes are scope link; v6 routes carry no scope at all.
            if dst.version == 4 and entry.scope != RT_SCOPE_LINK:
                continue
            if dst.is_multicast or (dst.version == 6 and dst.is_link_local):
                continue
            dev = None if entry.oif is None else names.get(entry.oif)
            if dev is None or dev in (exclude, "lo"):
                continue
            found.add(Connected(dev, dst))
        return tuple(sorted(found, key=_connected_order))

    # -- datagrams ------------------------------------------------------------

    def probe(self, ifname: str, address: IPv4Address | IPv6Address) -> None:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
                s.sendto(b"", (str(address), DISCARD_PORT))
            log.debug("probed %s via %s", address, ifname)
        except OSError as e:
            raise KernelError(f"probe {address} via {ifname}: {e.strerror or e}") from None


def _connected_order(c: Connected) -> tuple[str, int, int, int]:
    return (c.dev, c.network.version, int(c.network.network_address), c.network.prefixlen)

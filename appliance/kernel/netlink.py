"""Links, addresses, routes and rules through rtnetlink (pyroute2 `IPRoute`).

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface
from socket import AF_INET, AF_INET6
from types import TracebackType
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
    Msg,
    net_of,
    parse_rule,
    route_kwargs,
    rule_kwargs,
)

log = logging.getLogger(__name__)

# "Already there" on add and "already gone" on remove are the contract's no-ops.
_ADD_OK = frozenset({errno.EEXIST})
_REMOVE_OK = frozenset({errno.ESRCH, errno.ENOENT, errno.EADDRNOTAVAIL, errno.ENODEV})

DISCARD_PORT = 9  # RFC 863: the peer throws the probe away


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
    except NetlinkError as exc:
        if exc.code in ok:
            log.debug("%s: %s (nothing to do)", what, os.strerror(exc.code))
            return
        # With extended acks the kernel's own explanation is in args[1].
        message = str(exc.args[1]) if len(exc.args) > 1 and exc.args[1] else ""
        raise _error(what, exc.code, message) from exc
    except OSError as exc:  # the socket itself failed (e.g. no permission)
        raise _error(what, exc.errno or 0, exc.strerror or "") from exc


def _drop_unclaimed(ipr: Any) -> None:
    """pyroute2 0.9 files a reply that arrives after its request was answered
    (the kernel's ACK of a route or rule add/del) under tag 0, the multicast
    queue, which nobody reads with groups=0: ~70 bytes kept per change, for
    ever (scripts/bench/soak found the agent's RSS growing by 0.5 MB a minute
    at one change a second). Dropped before each request; all are stale."""
    queue = getattr(getattr(getattr(ipr, "asyncore", None), "msg_queue", None), "queues", {}).get(0)
    while queue is not None and not queue.empty():
        queue.get_nowait()
        queue.task_done()


class NetlinkLinks:
    """`Links` on the running kernel. One netlink socket, opened on first use in
    the network namespace the caller is in at that moment."""

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

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
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def _ip(self) -> Any:
        if self._ipr is None:
            with _netlink("open netlink socket"):
                # groups=0: we only ask, so subscribe to no multicast events
                # (they would otherwise queue up unread in a long-running agent).
                # ext_ack: the kernel then says *why* ("Nexthop device is not up").
                self._ipr = IPRoute(groups=0, ext_ack=True)
        _drop_unclaimed(self._ipr)
        return self._ipr

    # -- links ---------------------------------------------------------------

    def _link(self, ifname: str) -> Msg | None:
        try:
            with _netlink(f"look up interface {ifname}"):
                return self._ip.link("get", ifname=ifname)[0]
        except InterfaceNotFound:
            return None

    def _index(self, ifname: str, what: str) -> int:
        link = self._link(ifname)
        if link is None:
            raise InterfaceNotFound(f"{what}: no such interface {ifname}")
        return int(link["index"])

    def _names(self) -> Mapping[int, str]:
        with _netlink("list interfaces"):
            return {m["index"]: m.get_attr("IFLA_IFNAME") for m in self._ip.link("dump")}

    def exists(self, ifname: str) -> bool:
        return self._link(ifname) is not None

    def mtu(self, ifname: str) -> int | None:
        link = self._link(ifname)
        return None if link is None else int(link.get_attr("IFLA_MTU"))

    def set_mtu_up(self, ifname: str, mtu: int) -> None:
        what = f"set {ifname} mtu {mtu} up"
        index = self._index(ifname, what)
        with _netlink(what):
            self._ip.link("set", index=index, mtu=mtu, state="up")

    def delete_link(self, ifname: str) -> None:
        link = self._link(ifname)
        if link is None:
            return
        with _netlink(f"delete interface {ifname}", ok=frozenset({errno.ENODEV})):
            self._ip.link("del", index=link["index"])

    # -- addresses -----------------------------------------------------------

    def addresses(self, ifname: str) -> frozenset[IPInterface]:
        """Addresses on `ifname`, without the IPv6 link-local ones the kernel
        makes by itself (meshpi never assigns those)."""
        what = f"list addresses on {ifname}"
        index = self._index(ifname, what)
        found: set[IPInterface] = set()
        with _netlink(what):
            for msg in self._ip.addr("dump", index=index):
                if msg["index"] != index:
                    continue
                if msg["family"] == AF_INET:
                    # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
                    # peer's on point-to-point links).
                    addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                    found.add(IPv4Interface(f"{addr}/{msg['prefixlen']}"))
                elif msg["family"] == AF_INET6:
                    v6 = IPv6Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
                    if not v6.is_link_local:
                        found.add(v6)
        return frozenset(found)

    def add_address(self, ifname: str, address: IPInterface) -> None:
        what = f"add address {address} dev {ifname}"
        kw: dict[str, Any] = {
            "index": self._index(ifname, what),
            "address": str(address.ip),
            "prefixlen": address.network.prefixlen,
        }
        if address.version == 6:
            # No duplicate address detection: usable at once, not "tentative"
            # for a second or two (a mesh address is unique by construction).
            kw["flags"] = IFA_F_NODAD
        with _netlink(what, ok=_ADD_OK):
            self._ip.addr("add", **kw)

    def remove_address(self, ifname: str, address: IPInterface) -> None:
        link = self._link(ifname)
        if link is None:  # the interface took its addresses with it
            return
        what = f"remove address {address} dev {ifname}"
        with _netlink(what, ok=_REMOVE_OK):
            self._ip.addr(
                "del",
                index=link["index"],
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )

    # -- routes --------------------------------------------------------------

    def _unicast_routes(self) -> Iterator[tuple[Msg, IPNetwork]]:
        for family in (AF_INET, AF_INET6):
            with _netlink("list routes"):
                msgs = tuple(self._ip.route("dump", family=family))
            for msg in msgs:
                if msg["type"] == RTN_UNICAST:
                    yield msg, net_of(msg.get_attr("RTA_DST"), msg["dst_len"], family)

    def routes(self, scope: Scope) -> frozenset[Route]:
        names = self._names()
        found: set[Route] = set()
        for msg, dst in self._unicast_routes():
            table = msg.get("table")
            dev = names.get(msg.get_attr("RTA_OIF"))
            if dev is None:  # multipath or no device: not a Route we could make
                continue
            mine = table == scope.table or (
                table == MAIN_TABLE and dev == scope.interface and msg["proto"] == RTPROT_STATIC
            )
            if mine:
                found.add(Route(dst, dev, table))
        return frozenset(found)

    def add_route(self, route: Route) -> None:
        what = f"add route {route}"
        kw = route_kwargs(route, self._index(route.dev, what))
        kw["proto"] = RTPROT_STATIC  # how routes() tells ours from the rest
        if route.dst.version == 4:
            # What `ip route add ... dev X` does for a route without a gateway.
            kw["scope"] = RT_SCOPE_LINK
        with _netlink(what):
            try:
                self._ip.route("add", **kw)
                return
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        # "File exists" is a no-op only when the route there goes out the same interface.
        holder = self._route_holder(route)
        if holder is None or holder == kw["oif"]:
            return
        if route.table == MAIN_TABLE:  # someone else's route: never taken over
            other = self._names().get(holder, f"index {holder}")
            raise KernelError(f"{what}: the main table already routes {route.dst} through {other}")
        with _netlink(f"replace route {route}"):  # meshpi's own table: what is there is a leftover
            self._ip.route("replace", **kw)

    def _route_holder(self, route: Route) -> int | None:
        """The interface index of the unicast route to exactly route.dst in its table (None: none)."""
        for msg, dst in self._unicast_routes():
            if dst == route.dst and msg.get("table") == route.table:
                return int(msg.get_attr("RTA_OIF") or 0)
        return None

    def remove_route(self, route: Route) -> None:
        link = self._link(route.dev)
        if link is None:  # routes leave with their interface
            return
        kw = route_kwargs(route, link["index"])
        # Any scope, as `ip route del` asks: an IPv4 delete otherwise matches only
        # scope-universe routes, and ESRCH would pass for "already gone".
        kw["scope"] = RT_SCOPE_NOWHERE
        with _netlink(f"remove route {route}", ok=_REMOVE_OK):
            self._ip.route("del", **kw)

    # -- rules ---------------------------------------------------------------

    def _rules(self) -> frozenset[Rule]:
        found: set[Rule] = set()
        for family in (AF_INET, AF_INET6):
            with _netlink("list rules"):
                msgs = tuple(self._ip.rule("dump", family=family))
            for msg in msgs:
                rule = parse_rule(msg)
                if rule is not None:
                    found.add(rule)
                elif msg.get_attr("FRA_PRIORITY") in RULE_PRIORITIES:
                    log.debug("ignoring rule %s: not expressible as a Rule", msg)
        return frozenset(found)

    def rules(self, scope: Scope) -> frozenset[Rule]:
        return frozenset(r for r in self._rules() if r.priority in RULE_PRIORITIES)

    def add_rule(self, rule: Rule) -> None:
        with _netlink(f"add rule {rule}", ok=_ADD_OK):
            self._ip.rule("add", **rule_kwargs(rule))

    def remove_rule(self, rule: Rule) -> None:
        # The kernel deletes the first rule matching the attributes *given*
        # (and ignores the invert flag), so a rule that is already gone could
        # take a similar one with it. Delete only what is really there.
        if rule not in self._rules():
            log.debug("remove rule %s: not there", rule)
            return
        with _netlink(f"remove rule {rule}", ok=_REMOVE_OK):
            self._ip.rule("del", **rule_kwargs(rule))

    # -- host facts ----------------------------------------------------------

    def connected(self, exclude: str) -> tuple[Connected, ...]:
        names = self._names()
        found: set[Connected] = set()
        for msg, dst in self._unicast_routes():
            if msg.get("table") != MAIN_TABLE or msg["proto"] != RTPROT_KERNEL:
                continue
            # v4 prefix routes are scope link; v6 routes carry no scope at all.
            if dst.version == 4 and msg["scope"] != RT_SCOPE_LINK:
                continue
            if dst.is_multicast or (dst.version == 6 and dst.is_link_local):
                continue
            dev = names.get(msg.get_attr("RTA_OIF"))
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

"""NetlinkLinks against the real kernel, in a throwaway namespace.

Topology, inside the namespace (this kernel has no `dummy` module, so a veth
pair stands in for an interface to hang things on):

    d0 <==veth==> d0p      both up; d0 plays the mesh interface
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_network

import pytest

from appliance.base.net import IPInterface
from appliance.core.model import Connected, Route, Rule, Scope
from appliance.kernel.base import InterfaceNotFound, KernelError
from appliance.kernel.netlink import NetlinkLinks

T = 51820
M = 0xCA6C
SCOPE = Scope(interface="d0", table=T, fwmark=M)

PLANNER_RULES = frozenset(
    rule
    for family, lan in ((4, IPv4Network("10.77.0.0/24")), (6, IPv6Network("fd77::/64")))
    for rule in (
        Rule(priority=5210, family=family, table=254, fwmark=M),
        Rule(priority=5230, family=family, table=T, dst=lan),
        Rule(priority=5250, family=family, table=254, suppress_prefixlength=0),
        Rule(priority=5270, family=family, table=T, fwmark=M, invert=True),
    )
)
PLANNER_ROUTES = frozenset(
    {
        Route(IPv4Network("0.0.0.0/0"), "d0", T),
        Route(IPv6Network("::/0"), "d0", T),
        Route(IPv4Network("192.168.77.0/24"), "d0"),
    }
)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def veth(name: str, up: bool = True) -> None:
    ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
    if up:
        ip("link", "set", f"{name}p", "up")
        ip("link", "set", name, "up")


@pytest.fixture
def links(inside: str) -> Iterator[NetlinkLinks]:
    veth("d0")
    with NetlinkLinks() as links:
        yield links


def test_links_exists_mtu_and_set_mtu_up(inside: str) -> None:
    ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p")
    with NetlinkLinks() as links:
        assert links.exists("d0") and not links.exists("nope0")
        assert links.mtu("d0") == 1500 and links.mtu("nope0") is None
        links.set_mtu_up("d0", 1280)
        links.set_mtu_up("d0", 1280)  # idempotent
        assert links.mtu("d0") == 1280
        (info,) = json.loads(ip("-j", "link", "show", "d0"))
        assert "UP" in info["flags"]
        with pytest.raises(InterfaceNotFound, match="set nope0 mtu 1280 up: no such interface"):
            links.set_mtu_up("nope0", 1280)


def test_links_delete_link_and_already_gone(links: NetlinkLinks) -> None:
    links.delete_link("d0")
    assert not links.exists("d0") and not links.exists("d0p")
    links.delete_link("d0")


def test_links_address_round_trip(links: NetlinkLinks) -> None:
    wanted: set[IPInterface] = {
        IPv4Interface("100.64.0.1/10"),
        IPv6Interface("fd7a:115c:a1e0::1/48"),
    }
    for address in wanted:
        links.add_address("d0", address)
        links.add_address("d0", address)  # already there: fine
    # The kernel's own fe80:: address is not reported.
    assert links.addresses("d0") == wanted
    for address in wanted:
        links.remove_address("d0", address)
        links.remove_address("d0", address)  # already gone: fine
    assert links.addresses("d0") == frozenset()
    links.remove_address("nope0", IPv4Interface("100.64.0.1/10"))  # interface gone: fine


def test_links_ipv6_address_usable_at_once(links: NetlinkLinks) -> None:
    links.add_address("d0", IPv6Interface("fd7a:115c:a1e0::1/48"))
    (info,) = json.loads(ip("-j", "-6", "addr", "show", "d0", "scope", "global"))
    flags = info["addr_info"][0]
    assert not flags.get("tentative") and flags.get("nodad")
    # Binding a tentative address fails with EADDRNOTAVAIL; this one is ready.
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("fd7a:115c:a1e0::1", 0))


def test_links_address_on_missing_interface_names_it(links: NetlinkLinks) -> None:
    with pytest.raises(InterfaceNotFound, match="add address 10.0.0.1/8 dev nope0"):
        links.add_address("nope0", IPv4Interface("10.0.0.1/8"))
    with pytest.raises(InterfaceNotFound, match="nope0"):
        links.addresses("nope0")


def test_links_route_round_trip(links: NetlinkLinks) -> None:
    for route in PLANNER_ROUTES:
        links.add_route(route)
        links.add_route(route)  # already there: fine
    assert links.routes(SCOPE) == PLANNER_ROUTES
    assert "192.168.77.0/24 dev d0 proto static scope link" in ip("-4", "route")
    for route in PLANNER_ROUTES:
        links.remove_route(route)
        links.remove_route(route)  # already gone: fine
    assert links.routes(SCOPE) == frozenset()


def test_links_routes_are_only_ours(links: NetlinkLinks) -> None:
    links.add_address("d0", IPv4Interface("100.64.0.1/10"))  # kernel prefix route: not ours
    links.add_address("d0", IPv6Interface("fd7a::1/64"))
    ip("route", "add", "10.1.0.0/16", "dev", "d0", "proto", "boot")  # someone else's
    ip("route", "add", "10.2.0.0/16", "dev", "d0p", "proto", "static")  # another interface
    ip("route", "add", "10.3.0.0/16", "dev", "d0p", "table", str(T))  # anything in our table
    assert links.routes(SCOPE) == {Route(IPv4Network("10.3.0.0/16"), "d0p", T)}


def test_links_routes_leave_with_interface(links: NetlinkLinks) -> None:
    route = Route(IPv4Network("0.0.0.0/0"), "d0", T)
    links.add_route(route)
    links.delete_link("d0")
    assert links.routes(SCOPE) == frozenset()
    links.remove_route(route)  # the device is gone, and so is the route: fine


def test_links_route_errors_name_the_route(links: NetlinkLinks) -> None:
    veth("d1", up=False)
    with pytest.raises(KernelError, match=r"add route 10.0.0.0/8 dev d1 table 51820: .*not up"):
        links.add_route(Route(IPv4Network("10.0.0.0/8"), "d1", T))
    with pytest.raises(InterfaceNotFound, match="add route ::/0 dev nope0: no such interface"):
        links.add_route(Route(IPv6Network("::/0"), "nope0"))


def test_links_rules_round_trip_every_planner_shape(links: NetlinkLinks) -> None:
    for rule in PLANNER_RULES:
        links.add_rule(rule)
        links.add_rule(rule)  # already there: fine
    assert links.rules(SCOPE) == PLANNER_RULES
    text = ip("-4", "rule")
    assert "5270:\tnot from all fwmark 0xca6c lookup 51820" in text
    assert "5250:\tfrom all lookup main suppress_prefixlength 0" in text
    for rule in PLANNER_RULES:
        links.remove_rule(rule)
        links.remove_rule(rule)  # already gone: fine
    assert links.rules(SCOPE) == frozenset()
    assert "5210" not in ip("-6", "rule")


def test_links_rules_outside_our_range_are_not_ours(links: NetlinkLinks) -> None:
    ip("rule", "add", "priority", "100", "fwmark", str(M), "lookup", str(T))
    ip("rule", "add", "priority", "5299", "iif", "d0", "lookup", str(T))  # not a Rule shape
    assert links.rules(SCOPE) == frozenset()


def test_links_remove_absent_rule_spares_similar_rule(links: NetlinkLinks) -> None:
    kept = Rule(priority=5250, family=4, table=254, suppress_prefixlength=0)
    links.add_rule(kept)
    # The kernel would match this one against `kept` (unset fields are wildcards).
    links.remove_rule(Rule(priority=5250, family=4, table=254))
    assert links.rules(SCOPE) == {kept}


def test_links_connected_prefixes(links: NetlinkLinks) -> None:
    veth("mesh0")
    links.add_address("d0", IPv4Interface("192.168.1.2/24"))
    links.add_address("d0", IPv6Interface("2001:db8:1::2/64"))
    links.add_address("mesh0", IPv4Interface("100.64.0.1/10"))
    links.add_address("lo", IPv4Interface("10.9.9.9/24"))
    ip("route", "add", "10.5.0.0/16", "dev", "d0")  # static: not connected
    assert links.connected(exclude="mesh0") == (
        Connected("d0", ip_network("192.168.1.0/24")),
        Connected("d0", ip_network("2001:db8:1::/64")),
    )
    assert links.connected(exclude="d0") == (Connected("mesh0", ip_network("100.64.0.0/10")),)


def test_links_route_held_by_another_interface_is_not_taken_for_ours(links: NetlinkLinks) -> None:
    veth("d1")
    # In the main table it is someone else's route (another VPN, a leftover): refused, named.
    ip("route", "add", "10.4.0.0/16", "dev", "d1")
    with pytest.raises(KernelError, match=r"add route 10.4.0.0/16 dev d0: the main table already routes "
                                          r"10.4.0.0/16 through d1"):  # fmt: skip
        links.add_route(Route(IPv4Network("10.4.0.0/16"), "d0"))
    assert "10.4.0.0/16 dev d1" in ip("-4", "route")
    # In meshpi's own table, what is there is a leftover: replaced.
    ip("route", "add", "10.5.0.0/16", "dev", "d1", "table", str(T))
    ip("-6", "route", "add", "fd00:5::/64", "dev", "d1", "table", str(T))
    ours = {Route(IPv4Network("10.5.0.0/16"), "d0", T), Route(IPv6Network("fd00:5::/64"), "d0", T)}
    for route in ours:
        links.add_route(route)
    assert links.routes(SCOPE) == ours

"""Peers' routes over this host's own networks: set aside one by one, never the whole netmap."""

from ipaddress import ip_network

from appliance.core.conflicts import Conflict, classify
from appliance.core.model import Connected, HostFacts, Route
from appliance.core.planner import make_plan
from appliance.core.prefs import Prefs
from appliance.wire.netmap import parse_netmap
from tests.unit.meshes import KEYS, netmap_json, node

HOME_LAN = ip_network("192.168.77.0/24")
OFFICE = ip_network("10.20.0.0/16")
PREFS = Prefs(interface="meshpi1", exit_node="pi")


def _netmap(pi_routes: list[str], office_routes: list[str] | None = None):  # type: ignore[no-untyped-def]
    pi = node("pi", pi_routes, endpoint="198.51.100.1:51820")
    office = node("office", office_routes or [str(OFFICE)], endpoint="203.0.113.7:51820")
    return parse_netmap(netmap_json("laptop", [pi, office]))


def _facts(*nets: str) -> HostFacts:
    return HostFacts(tuple(Connected("eth0", ip_network(n)) for n in nets))


def test_conflicts_classify_equal_inside_containing_and_unrelated() -> None:
    lan = ip_network("192.168.1.0/24")
    assert classify(ip_network("192.168.1.0/24"), lan) is Conflict.EQUALS_LOCAL
    assert classify(ip_network("192.168.1.128/25"), lan) is Conflict.INSIDE_LOCAL
    assert classify(ip_network("192.168.0.0/16"), lan) is Conflict.CONTAINS_LOCAL
    assert classify(ip_network("192.168.2.0/24"), lan) is None
    assert classify(ip_network("2001:db8::/32"), lan) is None  # another family


def test_conflicts_equal_prefix_sets_aside_one_route_and_plans_the_rest() -> None:
    netmap = _netmap(["0.0.0.0/0", "::/0", str(HOME_LAN)])
    result = make_plan(netmap, PREFS, KEYS["laptop"], _facts("192.168.77.0/24"))
    (aside,) = result.set_aside
    assert (aside.route, aside.peer, aside.kind, aside.dev) == (HOME_LAN, "pi", Conflict.EQUALS_LOCAL, "eth0")
    assert str(aside) == (
        "route 192.168.77.0/24 from pi set aside: it equals 192.168.77.0/24 on this host's eth0"
    )
    state = result.state
    pi = state.peers[KEYS["pi"].public_key()]
    office = state.peers[KEYS["office"].public_key()]
    # Neither routed nor taken from the peer; everything else is there.
    assert HOME_LAN not in pi.allowed_ips and Route(HOME_LAN, "meshpi1", 51820) not in state.routes
    assert ip_network("0.0.0.0/0") in pi.allowed_ips and ip_network("100.64.0.1/32") in pi.allowed_ips
    assert OFFICE in office.allowed_ips and Route(OFFICE, "meshpi1", 51820) in state.routes
    assert Route(ip_network("0.0.0.0/0"), "meshpi1", 51820) in state.routes
    assert any(r.priority == 5270 for r in state.rules)


def test_conflicts_route_inside_a_local_network_is_set_aside() -> None:
    result = make_plan(
        _netmap([str(HOME_LAN)]), Prefs(interface="meshpi1"), KEYS["laptop"], _facts("192.168.0.0/16")
    )
    (aside,) = result.set_aside
    assert aside.kind is Conflict.INSIDE_LOCAL and aside.network == ip_network("192.168.0.0/16")
    assert result.state.routes == {Route(OFFICE, "meshpi1", 51820)}


def test_conflicts_route_containing_a_local_network_is_kept_and_reported() -> None:
    # The office's 10.0.0.0/8 while the café is 10.20.5.0/24: main (with the café's
    # connected route) is consulted before meshpi's table, so the café stays local.
    netmap = _netmap([str(HOME_LAN)], ["10.0.0.0/8"])
    result = make_plan(netmap, Prefs(interface="meshpi1"), KEYS["laptop"], _facts("10.20.5.0/24"))
    (conflict,) = result.conflicts
    assert conflict.kind is Conflict.CONTAINS_LOCAL and not conflict.set_aside and result.set_aside == ()
    assert "10.20.5.0/24 on this host's eth0 stays local" in str(conflict)
    assert Route(ip_network("10.0.0.0/8"), "meshpi1", 51820) in result.state.routes
    assert any(r.suppress_prefixlength == 0 for r in result.state.rules)


def test_conflicts_exit_routes_never_conflict() -> None:
    result = make_plan(
        _netmap(["0.0.0.0/0", "::/0"]), PREFS, KEYS["laptop"], _facts("192.168.1.0/24", "2001:db8:1::/64")
    )
    assert result.conflicts == ()


def test_conflicts_v6_prefix_and_mesh_range() -> None:
    netmap = _netmap(["2001:db8:1::/64", "100.64.0.9/32"], ["100.0.0.0/8", str(OFFICE)])
    result = make_plan(netmap, Prefs(interface="meshpi1"), KEYS["laptop"], _facts("2001:db8:1::/64"))
    kinds = {(c.peer, str(c.route)): c.kind for c in result.set_aside}
    assert kinds == {
        ("pi", "2001:db8:1::/64"): Conflict.EQUALS_LOCAL,
        ("office", "100.0.0.0/8"): Conflict.OVERLAPS_MESH,  # would claim every peer's address
    }
    office = result.state.peers[KEYS["office"].public_key()]
    assert ip_network("100.0.0.0/8") not in office.allowed_ips and OFFICE in office.allowed_ips
    # A device the pi hosts, inside the mesh range, is kept.
    pi = result.state.peers[KEYS["pi"].public_key()]
    assert ip_network("100.64.0.9/32") in pi.allowed_ips
    assert "the mesh range 100.64.0.0/10" in str(next(c for c in result.set_aside if c.peer == "office"))


def test_conflicts_routes_not_accepted_conflict_with_nothing() -> None:
    prefs = Prefs(interface="meshpi1", accept_routes=False)
    assert (
        make_plan(_netmap([str(HOME_LAN)]), prefs, KEYS["laptop"], _facts("192.168.77.0/24")).conflicts == ()
    )


def test_conflicts_a_mesh_route_taking_another_nodes_address_is_set_aside_even_without_accept_routes() -> (
    None
):
    # office claims the pi's mesh address, a /24 of the mesh, and (legitimately) a phone's address
    netmap = _netmap(["0.0.0.0/0", "::/0"], [str(OFFICE), "100.64.0.1/32", "100.64.9.0/24", "100.64.0.77/32"])
    for accept in (True, False):
        prefs = Prefs(interface="meshpi1", exit_node="pi", accept_routes=accept)
        result = make_plan(netmap, prefs, KEYS["laptop"], _facts("10.77.0.0/24"))
        kinds = {(str(c.route), c.kind) for c in result.set_aside}
        assert ("100.64.0.1/32", Conflict.TAKES_NODE) in kinds and (
            "100.64.9.0/24",
            Conflict.MESH_NOT_HOST,
        ) in kinds
        office = result.state.peers[KEYS["office"].public_key()]
        allowed = {str(n) for n in office.allowed_ips}
        assert "100.64.0.1/32" not in allowed and "100.64.9.0/24" not in allowed
        assert "100.64.0.77/32" in allowed  # a hosted phone's address no node holds
        pi = result.state.peers[KEYS["pi"].public_key()]
        assert "100.64.0.1/32" in {str(n) for n in pi.allowed_ips}  # the pi keeps its own
        assert "takes another node's address" in str(
            next(c for c in result.set_aside if c.kind is Conflict.TAKES_NODE)
        )

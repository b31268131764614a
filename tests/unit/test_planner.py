from ipaddress import ip_interface, ip_network

import pytest

from appliance.core.model import MAIN_TABLE, Connected, HostFacts, Route, Rule
from appliance.core.planner import exit_node_problem, plan
from appliance.core.prefs import Prefs
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import parse_netmap
from tests.unit.meshes import (
    KEYS,
    LAPTOP_FACTS,
    PI_FACTS,
    laptop_netmap,
    netmap_json,
    node,
    pi_netmap,
)

LAN = ip_network("192.168.77.0/24")
PI_PREFS = Prefs(advertise_exit_node=True, advertise_routes=(LAN,))
LAPTOP_PREFS = Prefs(interface="meshpi1", exit_node="pi")


def test_planner_exit_node_forwards_and_firewalls() -> None:
    state = plan(pi_netmap(), PI_PREFS, KEYS["pi"], PI_FACTS)
    assert state.device is not None and state.device.name == "meshpi0"
    assert state.device.mtu == 1280 and state.device.listen_port == 51820
    assert state.addresses == {ip_interface("100.64.0.1/10"), ip_interface("fd7a:6d70:6900::1/48")}
    (laptop,) = state.peers.values()
    assert [str(n) for n in laptop.allowed_ips] == ["100.64.0.2/32", "fd7a:6d70:6900::2/128"]
    assert laptop.endpoint is None and laptop.persistent_keepalive == 0
    assert state.sysctls["net.ipv4.ip_forward"] == "1"
    assert state.sysctls["net.ipv6.conf.all.forwarding"] == "1"
    assert state.rules == frozenset() and state.routes == frozenset()
    assert state.nft is not None
    assert "exit node: mesh to internet" in state.nft.text
    assert "@shared_v4 accept" in state.nft.text
    assert 'ip saddr 100.64.0.0/10 oifname != "meshpi0" counter masquerade' in state.nft.text


def test_planner_shares_lan_only_when_advertised_and_approved() -> None:
    not_approved = plan(pi_netmap(pi_routes=["0.0.0.0/0", "::/0"]), PI_PREFS, KEYS["pi"], PI_FACTS)
    not_advertised = plan(pi_netmap(), Prefs(advertise_exit_node=True), KEYS["pi"], PI_FACTS)
    for state in (not_approved, not_advertised):
        assert state.nft is not None and "shared_v4" not in state.nft.text
        assert "@lan_v4 counter drop" in state.nft.text


def test_planner_exit_node_needs_approval() -> None:
    state = plan(pi_netmap(pi_routes=["192.168.77.0/24"]), PI_PREFS, KEYS["pi"], PI_FACTS)
    assert state.nft is not None
    assert "exit node: mesh to internet" not in state.nft.text
    assert 'counter drop comment "not an exit node"' in state.nft.text


def test_planner_plain_node_has_no_firewall_and_no_forwarding() -> None:
    state = plan(laptop_netmap(), Prefs(interface="meshpi1"), KEYS["laptop"], LAPTOP_FACTS)
    assert state.nft is None
    assert "net.ipv4.ip_forward" not in state.sysctls
    (pi,) = state.peers.values()
    # The pi's subnet route is accepted, its exit routes are not (not chosen).
    assert [str(n) for n in pi.allowed_ips] == [
        "100.64.0.1/32",
        "192.168.77.0/24",
        "fd7a:6d70:6900::1/128",
    ]
    assert pi.persistent_keepalive == 25 and str(pi.endpoint) == "198.51.100.1:51820"
    # The subnet route lives in meshpi's table, behind the fwmark rules (v4 only:
    # the table has no v6 route), so WireGuard's own packets never follow it.
    assert state.routes == {Route(LAN, "meshpi1", 51820)}
    assert state.rules == {
        Rule(5210, 4, MAIN_TABLE, fwmark=51820),
        Rule(5250, 4, MAIN_TABLE, suppress_prefixlength=0),
        Rule(5270, 4, 51820, fwmark=51820, invert=True),
    }
    assert state.sysctls["net.ipv4.conf.all.src_valid_mark"] == "1"


def test_planner_exit_client_policy_routing_wg_quick_style() -> None:
    state = plan(laptop_netmap(), LAPTOP_PREFS, KEYS["laptop"], LAPTOP_FACTS)
    (pi,) = state.peers.values()
    assert ip_network("0.0.0.0/0") in pi.allowed_ips and ip_network("::/0") in pi.allowed_ips
    assert Route(ip_network("0.0.0.0/0"), "meshpi1", 51820) in state.routes
    assert Route(ip_network("::/0"), "meshpi1", 51820) in state.routes
    expected = set()
    for fam in (4, 6):
        expected |= {
            Rule(5210, fam, MAIN_TABLE, fwmark=51820),
            Rule(5250, fam, MAIN_TABLE, suppress_prefixlength=0),
            Rule(5270, fam, 51820, fwmark=51820, invert=True),
        }
    expected.add(Rule(5230, 4, 51820, dst=ip_network("10.77.0.0/24")))
    assert state.rules == expected
    assert state.sysctls["net.ipv4.conf.all.src_valid_mark"] == "1"
    assert state.device is not None and state.device.fwmark == 51820


def test_planner_allow_lan_access_keeps_lan_out_of_the_tunnel() -> None:
    prefs = LAPTOP_PREFS.with_changes(exit_node_allow_lan_access=True)
    state = plan(laptop_netmap(), prefs, KEYS["laptop"], LAPTOP_FACTS)
    assert not [r for r in state.rules if r.priority == 5230]


def test_planner_exit_node_by_address() -> None:
    state = plan(
        laptop_netmap(),
        LAPTOP_PREFS.with_changes(exit_node="100.64.0.1"),
        KEYS["laptop"],
        LAPTOP_FACTS,
    )
    assert state.rules


def test_planner_fails_closed_when_the_exit_node_is_not_offered() -> None:
    netmap = laptop_netmap(pi_routes=["192.168.77.0/24"])  # the pi no longer offers 0/0
    state = plan(netmap, LAPTOP_PREFS, KEYS["laptop"], LAPTOP_FACTS)
    offered = plan(laptop_netmap(), LAPTOP_PREFS, KEYS["laptop"], LAPTOP_FACTS)
    # The same rules and routes into the tunnel, but no peer takes 0/0: WireGuard drops it.
    assert state.rules == offered.rules and state.routes == offered.routes
    assert not any(n.prefixlen == 0 for p in state.peers.values() for n in p.allowed_ips)
    problem = exit_node_problem(netmap, LAPTOP_PREFS)
    assert problem is not None and "'pi'" in problem and "blocked" in problem
    assert exit_node_problem(laptop_netmap(), LAPTOP_PREFS) is None
    assert exit_node_problem(netmap, LAPTOP_PREFS.with_changes(exit_node=None)) is None


def test_planner_rejects_a_netmap_for_another_node() -> None:
    with pytest.raises(ConfigError) as e:
        plan(pi_netmap(), PI_PREFS, KEYS["laptop"], PI_FACTS)
    assert e.value.field == "self.public_key"
    assert str(KEYS["laptop"].public_key()) in str(e.value)


def test_planner_rejects_mesh_address_on_the_lan() -> None:
    facts = HostFacts((Connected("wan", ip_network("100.64.0.0/24")),))  # a CGNAT uplink
    with pytest.raises(ConfigError) as e:
        plan(laptop_netmap(), Prefs(interface="meshpi1"), KEYS["laptop"], facts)
    assert e.value.field == "self.addresses[0]" and "lies in 100.64.0.0/24" in str(e.value)


def test_planner_foreign_forwarding_is_left_alone() -> None:
    facts = HostFacts(PI_FACTS.connected, forwarding_preexisting=True)
    state = plan(pi_netmap(), PI_PREFS, KEYS["pi"], facts)
    assert state.nft is not None and "routes only for the mesh" not in state.nft.text
    strict = plan(pi_netmap(), PI_PREFS, KEYS["pi"], PI_FACTS)
    assert strict.nft is not None and "routes only for the mesh" in strict.nft.text


def test_planner_mss_clamp_follows_mtu() -> None:
    state = plan(pi_netmap(), PI_PREFS.with_changes(mtu=1420), KEYS["pi"], PI_FACTS)
    assert state.nft is not None
    assert "maxseg size set 1380" in state.nft.text and "maxseg size set 1360" in state.nft.text


def test_planner_hub_peers_get_each_others_routes() -> None:
    office = node("office", routes=["10.20.0.0/16"])
    netmap = parse_netmap(netmap_json("laptop", [office]))
    state = plan(netmap, Prefs(), KEYS["laptop"], LAPTOP_FACTS)
    assert Route(ip_network("10.20.0.0/16"), "meshpi0", 51820) in state.routes
    no_accept = plan(netmap, Prefs(accept_routes=False), KEYS["laptop"], LAPTOP_FACTS)
    assert no_accept.routes == frozenset() and no_accept.rules == frozenset()

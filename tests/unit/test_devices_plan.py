"""Hosted devices (phones) and key rotation in the pure parts: planner, nft, the
wg-quick config, and which peers get a handshake started."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from appliance.agent.handshakes import carried_endpoints, handshake_targets
from appliance.base.net import Endpoint
from appliance.core.model import HostedDevice, Route
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from appliance.core.wgquick import ClientConfig, allowed_ips
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import parse_netmap
from tests.unit.meshes import KEYS, LAPTOP_FACTS, MESH, PI_FACTS, netmap_json, node, pi_netmap

PHONE = HostedDevice(
    "alice phone", KEYS["phone"].public_key(), (ip_address("100.64.0.9"), ip_address("fd7a:6d70:6900::9"))
)


def test_a_hosted_device_is_a_peer_of_its_hub_and_may_go_out() -> None:
    # A pi that offers nothing to the mesh still forwards for its own phone.
    state = plan(pi_netmap(pi_routes=[]), Prefs(), KEYS["pi"], PI_FACTS, devices=(PHONE,))
    peer = state.peers[PHONE.public_key]
    assert [str(n) for n in peer.allowed_ips] == ["100.64.0.9/32", "fd7a:6d70:6900::9/128"]
    assert peer.endpoint is None and peer.persistent_keepalive == 0
    assert state.sysctls["net.ipv4.ip_forward"] == "1"
    assert state.nft is not None
    text = state.nft.text
    assert "set devices_v4" in text and "100.64.0.9" in text
    assert 'ip saddr @devices_v4 counter accept comment "a device this node hosts"' in text
    # ... and before the rule that keeps the mesh off the LAN.
    assert text.index("@devices_v4 counter accept") < text.index("@lan_v4 counter drop")
    without = plan(pi_netmap(pi_routes=[]), Prefs(), KEYS["pi"], PI_FACTS)
    assert without.nft is None and PHONE.public_key not in without.peers


def test_a_device_key_that_is_a_node_key_is_refused() -> None:
    laptop_as_phone = HostedDevice("x", KEYS["laptop"].public_key(), PHONE.addresses)
    with pytest.raises(ConfigError) as e:
        plan(pi_netmap(), Prefs(), KEYS["pi"], PI_FACTS, devices=(laptop_as_phone,))
    assert e.value.field == "[0].public_key"


def test_peers_reach_devices_behind_a_hub_without_accepting_routes() -> None:
    pi = node(
        "pi", ["100.64.0.9/32", "fd7a:6d70:6900::9/128", "192.168.77.0/24"], endpoint="198.51.100.1:51820"
    )
    netmap = parse_netmap(netmap_json("laptop", [pi]))
    state = plan(netmap, Prefs(interface="meshpi1", accept_routes=False), KEYS["laptop"], LAPTOP_FACTS)
    allowed = {str(n) for n in state.peers[KEYS["pi"].public_key()].allowed_ips}
    assert {"100.64.0.9/32", "fd7a:6d70:6900::9/128"} <= allowed and "192.168.77.0/24" not in allowed
    # Inside the mesh prefix: no route of its own, the prefix route covers it.
    accepting = plan(netmap, Prefs(interface="meshpi1"), KEYS["laptop"], LAPTOP_FACTS)
    assert accepting.routes == {Route(ip_network("192.168.77.0/24"), "meshpi1", 51820)}
    # Phones' addresses need neither a route nor the fwmark rules: with routes
    # accepted off, nothing goes through meshpi's table, so no rule is planned.
    assert state.routes == frozenset() and state.rules == frozenset()
    assert "net.ipv4.conf.all.src_valid_mark" not in state.sysctls


def test_the_client_config_is_what_wg_quick_reads() -> None:
    mesh = parse_netmap(netmap_json("pi", [])).mesh
    config = ClientConfig(
        private_key=KEYS["phone"],
        prefixes=PHONE.prefixes,
        hub_key=KEYS["pi"].public_key(),
        endpoint="home.example.org:51820",
        allowed_ips=allowed_ips("lan", mesh, [ip_network("192.168.77.0/24")]),
        mtu=1280,
    ).render()
    assert config == (
        "[Interface]\n"
        f"PrivateKey = {KEYS['phone'].secret_base64()}\n"
        "Address = 100.64.0.9/32, fd7a:6d70:6900::9/128\n"
        "MTU = 1280\n"
        "\n[Peer]\n"
        f"PublicKey = {KEYS['pi'].public_key()}\n"
        "Endpoint = home.example.org:51820\n"
        f"AllowedIPs = 100.64.0.0/10, 192.168.77.0/24, {MESH['ipv6']}\n"
        "PersistentKeepalive = 25\n"
    )
    assert [str(n) for n in allowed_ips("all", mesh, [])] == ["0.0.0.0/0", "::/0"]
    with pytest.raises(ValueError, match="'some'"):
        allowed_ips("some", mesh, [])


def test_handshakes_start_with_rotated_peers_and_after_our_own_rotation() -> None:
    before = parse_netmap(netmap_json("pi", [node("laptop"), node("office")]))
    rotated = node("laptop")
    rotated["public_key"] = str(KEYS["phone"].public_key())  # the laptop's new key
    after = parse_netmap(netmap_json("pi", [rotated, node("office")]))
    assert [str(a) for a in handshake_targets(before, after, {}, now=1000.0)] == ["100.64.0.2"]
    # The laptop had roamed to its NAT's address; its new peer starts there.
    learned = {KEYS["laptop"].public_key(): Endpoint(ip_address("192.0.2.1"), 41641)}
    assert carried_endpoints(before, after, learned) == {
        KEYS["phone"].public_key(): learned[KEYS["laptop"].public_key()]
    }
    # Our own key changed: every peer with a live session, and only those.
    me = node("pi")
    me["public_key"] = str(KEYS["phone"].public_key())
    moved = parse_netmap({"mesh": MESH, "self": me, "peers": [node("laptop"), node("office")]})
    recent = {KEYS["laptop"].public_key(): 990.0, KEYS["office"].public_key(): 500.0}
    assert [str(a) for a in handshake_targets(before, moved, recent, now=1000.0)] == ["100.64.0.2"]

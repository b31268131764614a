from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network, ip_network

from appliance.base.keys import PrivateKey
from appliance.control.mapper import delta, full_map
from appliance.control.store_records import Changes, NodeRecord, NodeState, Tombstone, address_pair
from appliance.wire.mapdelta import patched
from appliance.wire.netmap import Mesh, parse_netmap

MESH = Mesh(IPv4Network("100.64.0.0/10"), IPv6Network("fd7a:6d70:6900::/48"))
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def record(i: int, name: str, **kw: object) -> NodeRecord:
    v4, v6 = address_pair(MESH, i)
    base = NodeRecord(
        id=i, machine_key=PrivateKey(bytes([100 + i]) * 32).public_key(),
        node_key=PrivateKey(bytes([i]) * 32).public_key(), name=name, address_index=i,
        ipv4=v4, ipv6=v6, state=NodeState.APPROVED, tags=(), advertised_routes=(),
        approved_routes=(), endpoints=(), created=NOW, last_seen=None, key_expiry=None,
        expiry_exempt=False, version=i,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


def test_mapper_full_map_shows_visible_peers_and_served_routes_only() -> None:
    lan, exit4 = ip_network("192.168.77.0/24"), ip_network("0.0.0.0/0")
    pi = record(1, "pi", advertised_routes=(exit4, lan), approved_routes=(lan,))
    laptop = record(2, "laptop")
    pending = record(3, "stranger", state=NodeState.PENDING)
    expired = record(4, "old", key_expiry=NOW - timedelta(days=1))
    exempt = record(5, "appliance", key_expiry=NOW - timedelta(days=1), expiry_exempt=True)
    netmap = parse_netmap(full_map(MESH, laptop, [pi, laptop, pending, expired, exempt], NOW, 2))
    assert netmap.self_node.name == "laptop"
    assert [p.name for p in netmap.peers] == ["pi", "appliance"]
    # Advertised but not approved: the exit route is not served.
    assert netmap.peers[0].routes == (lan,)


def test_mapper_delta_patches_to_the_same_map_as_a_full_one() -> None:
    pi, laptop, phone = record(1, "pi"), record(2, "laptop"), record(3, "phone")
    before = parse_netmap(full_map(MESH, laptop, [pi, laptop, phone], NOW, 2))
    lan = ip_network("192.168.77.0/24")
    pi2 = replace(pi, advertised_routes=(lan,), approved_routes=(lan,), version=10)
    rotated = replace(phone, node_key=PrivateKey(bytes([33]) * 32).public_key(), version=11)
    changes = Changes(11, (pi2, rotated), (Tombstone(phone.node_key, 11),))
    after = patched(before, delta(laptop, changes, NOW, 2))
    assert after == parse_netmap(full_map(MESH, laptop, [pi2, laptop, rotated], NOW, 2))


def test_mapper_delta_removes_a_peer_that_is_no_longer_visible() -> None:
    pi, laptop = record(1, "pi"), record(2, "laptop")
    before = parse_netmap(full_map(MESH, laptop, [pi, laptop], NOW, 2))
    gone = replace(pi, state=NodeState.PENDING, version=5)
    after = patched(before, delta(laptop, Changes(5, (gone,), ()), NOW, 2))
    assert after.peers == ()


def test_mapper_delta_carries_own_changes_as_self() -> None:
    _pi, laptop = record(1, "pi"), record(2, "laptop")
    lan = ip_network("10.9.0.0/16")
    me = replace(laptop, advertised_routes=(lan,), approved_routes=(lan,), version=7)
    d = delta(laptop, Changes(7, (me,), ()), NOW, 2)
    assert d["self"]["routes"] == ["10.9.0.0/16"] and d["changed"] == []

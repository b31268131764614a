"""The control store's node records against real databases: registration and the
addresses and names it hands out, devices, and the mesh version each change bumps,
with the tombstones and deltas peers are sent. Every test runs on SQLite and on
PostgreSQL.

The helpers (a fixed clock, new keys, `register`) are test_store.py's."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

import pytest

from appliance.base.keys import PrivateKey
from appliance.base.net import Endpoint
from appliance.control.store import (
    DeltaUnavailable,
    NodeExists,
    NodeRecord,
    NodeState,
    NotFound,
    Store,
)
from appliance.control.store_sql import Tx
from tests.control.test_store import HOUR, NOW, new_key, register

# --- registration ---


def test_register_allocates_distinct_stable_addresses(store: Store) -> None:
    nodes = [register(store, f"host{i}") for i in range(3)]
    assert [n.address_index for n in nodes] == [1, 2, 3]
    assert nodes[0].ipv4 == IPv4Address("100.64.0.1")
    assert nodes[2].ipv6 == store.mesh.ipv6.network_address + 3
    assert [store.get_node(n.id) for n in nodes] == nodes
    assert store.list_nodes() == tuple(nodes)
    assert store.get_node_by_machine_key(nodes[1].machine_key) == nodes[1]
    assert store.get_node_by_node_key(nodes[1].node_key) == nodes[1]
    assert store.get_node_by_name("host2") == nodes[2]
    assert store.get_node_by_name("nobody") is None


def test_register_names_unique_names_from_hostnames(store: Store) -> None:
    names = [register(store, h).name for h in ("laptop", "laptop", "Laptop.local", "laptop-2")]
    assert names == ["laptop", "laptop-2", "laptop-3", "laptop-2-2"]
    assert register(store, "My Laptop (work)!").name == "my-laptop-work"
    assert register(store, "___").name == "node"
    assert len(register(store, "x" * 200).name) <= 63


def test_register_never_reuses_addresses_of_removed_nodes(
    open_stores: Callable[[], Store],
) -> None:
    store = open_stores()
    a, b = register(store, "a"), register(store, "b")
    store.remove_node(b.id)
    store.remove_node(a.id)
    assert store.list_nodes() == ()
    c = register(store, "c")
    assert c.address_index == 3
    store.close()
    d = register(open_stores(), "d")
    assert d.address_index == 4
    assert d.id not in (a.id, b.id, c.id)


def test_register_same_machine_is_idempotent_and_conflicts_are_refused(store: Store) -> None:
    node = register(store)
    again = store.register_node(node.machine_key, node.node_key, "other", now=NOW)
    assert again == node
    assert store.mesh_version() == 1
    with pytest.raises(NodeExists):
        store.register_node(node.machine_key, new_key(), "laptop", now=NOW)
    with pytest.raises(NodeExists):
        store.register_node(new_key(), node.node_key, "laptop", now=NOW)


def test_register_concurrent_never_duplicates_addresses_or_names(
    open_stores: Callable[[], Store],
) -> None:
    threads, each = 8, 25
    stores = [open_stores() for _ in range(threads)]  # one connection per thread
    start = threading.Barrier(threads)

    def worker(store: Store) -> list[NodeRecord]:
        start.wait()
        return [register(store, "laptop") for _ in range(each)]

    with ThreadPoolExecutor(threads) as pool:
        nodes = [n for batch in pool.map(worker, stores) for n in batch]

    assert sorted(n.address_index for n in nodes) == list(range(1, threads * each + 1))
    assert len({n.name for n in nodes}) == threads * each
    assert len({n.ipv4 for n in nodes}) == len({n.ipv6 for n in nodes}) == threads * each
    assert stores[0].mesh_version() == threads * each
    assert sorted(n.version for n in nodes) == list(range(1, threads * each + 1))


# --- versions and tombstones ---


def test_versions_every_peer_visible_change_bumps_once(store: Store) -> None:
    node = register(store, state=NodeState.PENDING)
    assert node.version == store.mesh_version() == 0 and node.addresses == ()
    endpoint = Endpoint(ip_address("192.0.2.7"), 41641)
    exit_routes = [ip_network("0.0.0.0/0"), ip_network("::/0")]
    changes: list[Callable[[], NodeRecord]] = [
        lambda: store.approve_node(node.id),
        lambda: store.set_endpoints(node.id, [endpoint]),
        lambda: store.set_advertised_routes(node.id, [*exit_routes, ip_network("192.168.1.0/24")]),
        lambda: store.approve_routes(node.id, exit_routes),
        lambda: store.set_expiry_exempt(node.id, True),
        lambda: store.expire_node_key(node.id, NOW),
        lambda: store.rotate_node_key(node.id, new_key(), NOW + HOUR),
    ]
    for expected, change in enumerate(changes, start=1):
        changed = change()
        assert changed.version == store.mesh_version() == expected
    final = store.get_node(node.id)
    assert final is not None and final.state == NodeState.APPROVED
    assert final.endpoints == (endpoint,)
    assert final.served_routes == tuple(exit_routes)
    assert final.key_expiry == NOW + HOUR and not final.expiry_exempt


def test_versions_repeating_a_value_changes_nothing(store: Store) -> None:
    node = register(store, state=NodeState.PENDING)
    endpoint = Endpoint(ip_address("2001:db8::1"), 51820)
    store.set_endpoints(node.id, [endpoint])
    version = store.mesh_version()
    assert store.set_endpoints(node.id, [endpoint]).version == version
    store.approve_node(node.id)
    assert store.approve_node(node.id).version == version + 1
    assert store.mesh_version() == version + 1


def test_versions_touch_last_seen_does_not_bump(store: Store) -> None:
    node = register(store)
    store.touch_last_seen(node.id, NOW + HOUR)
    seen = store.get_node(node.id)
    assert seen is not None and seen.last_seen == NOW + HOUR
    assert seen.version == node.version == store.mesh_version()
    assert store.changes_since(store.mesh_version()).nodes == ()
    with pytest.raises(NotFound):
        store.touch_last_seen(999)


def test_changes_since_returns_exactly_what_changed(store: Store) -> None:
    a, b, c = register(store, "a"), register(store, "b"), register(store, "c")
    base = store.mesh_version()
    assert store.changes_since(base).nodes == ()
    b2 = store.set_endpoints(b.id, [Endpoint(ip_address("198.51.100.1"), 1234)])
    tomb = store.remove_node(a.id)
    c2 = store.rotate_node_key(c.id, new_key())
    changes = store.changes_since(base)
    assert changes.version == base + 3
    assert changes.nodes == (b2, c2)
    assert {(t.public_key, t.version) for t in changes.tombstones} == {
        (a.node_key, tomb.version),
        (c.node_key, c2.version),  # peers must drop the rotated-away key
    }
    later = store.changes_since(b2.version)
    assert later.nodes == (c2,) and len(later.tombstones) == 2
    with pytest.raises(NotFound):
        store.remove_node(a.id)


def test_changes_since_reregistered_key_loses_its_tombstone(store: Store) -> None:
    node = register(store)
    store.remove_node(node.id)
    back = store.register_node(node.machine_key, node.node_key, "laptop", NodeState.APPROVED, now=NOW)
    changes = store.changes_since(0)
    assert changes.nodes == (back,) and changes.tombstones == ()
    assert back.address_index != node.address_index


def test_changes_since_refuses_deltas_it_cannot_give(store: Store) -> None:
    nodes = [register(store, f"n{i}") for i in range(3)]
    for node in nodes:
        store.remove_node(node.id)
    assert store.prune_tombstones(5) == 2
    assert len(store.changes_since(5).tombstones) == 1
    with pytest.raises(DeltaUnavailable):
        store.changes_since(4)
    with pytest.raises(DeltaUnavailable):
        store.changes_since(store.mesh_version() + 1)  # a version from another mesh


def add_nodes_in_bulk(store: Store, count: int) -> None:
    """`count` nodes as register_node would leave them, in one transaction: 2,000
    registrations would be 2,000 fsyncs (synchronous=FULL), seconds on a busy disk."""

    def work(tx: Tx) -> None:
        for i in range(1, count + 1):
            tx.run(
                "INSERT INTO nodes (machine_key, node_key, name, address_index, state, tags, "
                "advertised_routes, approved_routes, endpoints, created, expiry_exempt, version) "
                "VALUES (?, ?, ?, ?, 'pending', '[]', '[]', '[]', '[]', 0, ?, ?)",
                new_key().raw,
                new_key().raw,
                f"bulk-{i}",
                i,
                False,
                i,
            )
        tx.run("UPDATE meta SET mesh_version = ?, next_address_index = ?", count, count + 1)

    store.db.run(work)


def test_changes_since_costs_o_change_on_2000_nodes(store: Store) -> None:
    add_nodes_in_bulk(store, 2000)
    nodes = store.list_nodes()
    assert len(nodes) == 2000 and register(store).address_index == 2001
    version = store.mesh_version()
    changed = store.approve_node(nodes[1234].id)
    before = store.db.statements
    changes = store.changes_since(version)
    assert store.db.statements - before == 3  # meta, nodes, tombstones: no per-node query
    assert changes.nodes == (changed,) and changes.tombstones == ()
    if store.db.dialect == "sqlite":
        plan = store.db.run(
            lambda tx: tx.all("EXPLAIN QUERY PLAN SELECT id FROM nodes WHERE version > ?", version),
            write=False,
        )
        assert "nodes_version" in repr(plan)  # an index range, not a scan of the mesh


def test_store_devices_take_addresses_from_the_node_counter(open_stores: Callable[[], Store]) -> None:
    store = open_stores()
    hub = register(store, "pi")
    phone_key = PrivateKey.generate().public_key()
    hub = store.add_device(hub.id, "phone", phone_key)
    (phone,) = hub.devices
    assert phone.index == hub.address_index + 1
    assert phone.prefixes[0] == IPv4Network(f"{phone.ipv4}/32") and phone.prefixes[0] in hub.served_routes
    with pytest.raises(NodeExists, match="already has a device named 'phone'"):
        store.add_device(hub.id, "phone", PrivateKey.generate().public_key())
    with pytest.raises(NodeExists, match="already in the mesh"):
        store.add_device(hub.id, "tablet", hub.node_key)
    laptop = register(store, "laptop")
    assert laptop.address_index == phone.index + 1  # never the device's
    hub = store.remove_device(hub.id, phone_key)
    assert hub.devices == () and store.get_node(hub.id) == hub
    with pytest.raises(NotFound):
        store.remove_device(hub.id, phone_key)
    assert register(store, "desktop").address_index == laptop.address_index + 1  # not reused
    assert store.changes_since(0).nodes  # each device change took a version

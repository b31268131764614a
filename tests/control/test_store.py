"""The control store against real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

import pytest

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.control import migrations
from appliance.control.store import (
    AuthKeyError,
    DeltaUnavailable,
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    KeyUsed,
    NodeExists,
    NodeRecord,
    NodeState,
    NotFound,
    SchemaTooNew,
    Store,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    open_store,
)
from appliance.control.store_sql import Tx
from tests.control.conftest import PgCluster

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def new_key() -> PublicKey:
    return PrivateKey.generate().public_key()


def register(store: Store, hostname: str = "laptop", **kwargs: object) -> NodeRecord:
    """An approved node (admitted by a pre-auth key): it has addresses and a version."""
    kwargs.setdefault("state", NodeState.APPROVED)
    return store.register_node(new_key(), new_key(), hostname, now=NOW, **kwargs)  # type: ignore[arg-type]


def raw_rows(store: Store, table: str) -> list[tuple[object, ...]]:
    # The table name is one of this file's literals, never input.
    return [tuple(r) for r in store.db.run(lambda tx: tx.all(f"SELECT * FROM {table}"), write=False)]


# --- opening and migrations ---


def test_store_fresh_db_creates_mesh_and_runs_all_migrations(store: Store) -> None:
    assert store.mesh.ipv4 == IPv4Network("100.64.0.0/10")
    assert store.mesh.ipv6.prefixlen == 48
    assert store.mesh.ipv6.subnet_of(IPv6Network("fd00::/8"))
    assert store.mesh_version() == 0
    versions = [row[0] for row in raw_rows(store, "schema_version")]
    assert versions == [m.version for m in migrations.MIGRATIONS[store.db.dialect]]


def test_store_reopen_is_idempotent_and_keeps_everything(
    open_stores: Callable[[], Store],
) -> None:
    first = open_stores()
    node = register(first)
    schema = raw_rows(first, "schema_version")
    first.close()
    again = open_stores()
    assert again.mesh == first.mesh  # the random ULA is chosen once, at creation
    assert raw_rows(again, "schema_version") == schema
    assert again.get_node(node.id) == node
    assert again.mesh_version() == 1


def test_store_existing_db_runs_only_missing_migrations(
    open_stores: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = migrations.MIGRATIONS.copy()
    # A database made by a meshpi that knew schema version 1 only...
    for d in real:
        monkeypatch.setitem(migrations.MIGRATIONS, d, real[d][:1])
    old = open_stores()
    dialect = old.db.dialect
    v1_row = (new_key().raw, new_key().raw, "laptop", 5, "approved", "[]", "[]", "[]", "[]", 0, False, 1)
    old.db.run(
        lambda tx: tx.run(
            "INSERT INTO nodes (machine_key, node_key, name, address_index, state, tags, advertised_routes, "
            "approved_routes, endpoints, created, expiry_exempt, version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            *v1_row,
        )
    )
    old.close()
    # ... opened by this one: versions 2 (nodes.devices), 3 (pending without address)
    # and 4 (DNS names, given to the nodes already there) run.
    monkeypatch.setitem(migrations.MIGRATIONS, dialect, real[dialect])
    upgraded = open_stores()
    assert [row[0] for row in raw_rows(upgraded, "schema_version")] == [1, 2, 3, 4]
    (node,) = upgraded.list_nodes()
    assert node.name == "laptop" and node.address_index == 5 and node.devices == ()
    assert node.dns_name == "laptop" and node.version == upgraded.mesh_version() == 1  # woken: a new version
    with_phone = upgraded.add_device(node.id, "phone", PublicKey(bytes(range(32))))
    assert [(d.name, d.dns_name) for d in with_phone.devices] == [("phone", "phone")]
    # Ids are still never handed out twice (SQLite's table rebuild kept the counter).
    assert register(upgraded, "desk").id == node.id + 1
    upgraded.close()
    assert [row[0] for row in raw_rows(open_stores(), "schema_version")] == [1, 2, 3, 4]


def test_store_db_from_a_newer_meshpi_is_refused(open_stores: Callable[[], Store]) -> None:
    store = open_stores()
    store.db.run(
        lambda tx: tx.run(
            "INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
            99,
            "from the future",
            0,
        )
    )
    store.close()
    with pytest.raises(SchemaTooNew, match=r"schema version 99 .* newer meshpi"):
        open_stores()


def test_store_corrupt_sqlite_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "control.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(StoreCorrupt, match=str(path)):
        open_store(path)


def test_store_unopenable_sqlite_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "control.db"
    with pytest.raises(StoreUnavailable, match=str(path)):
        open_store(f"sqlite:///{path}")  # four slashes: an absolute path


def test_store_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(StoreUnavailable, match="mysql://x"):
        open_store("mysql://x")


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


# --- pre-auth keys ---


def test_preauth_single_use_key_admits_once(store: Store) -> None:
    key, secret = store.create_preauth_key(False, NOW + HOUR, ["tag:server"], now=NOW)
    assert secret.startswith(f"mpk-{key.id}-") and len(secret.split("-", 2)[2]) == 43
    assert (key.used, key.reusable, key.revoked, key.tags) == (0, False, False, ("tag:server",))
    used = store.use_preauth_key(secret, NOW)
    assert used.used == 1
    with pytest.raises(KeyUsed):
        store.use_preauth_key(secret, NOW)


def test_preauth_reusable_key_counts_uses(store: Store) -> None:
    _, secret = store.create_preauth_key(True, NOW + HOUR, now=NOW)
    for _ in range(3):
        key = store.use_preauth_key(secret, NOW)
    assert key.used == 3
    assert store.list_preauth_keys() == (key,)


def test_preauth_expired_revoked_and_wrong_keys_are_refused(store: Store) -> None:
    _, expired = store.create_preauth_key(True, NOW, now=NOW - HOUR)
    with pytest.raises(KeyExpired):
        store.use_preauth_key(expired, NOW)
    key, revoked = store.create_preauth_key(True, NOW + HOUR, now=NOW)
    assert store.revoke_preauth_key(key.id).revoked
    with pytest.raises(KeyRevoked):
        store.use_preauth_key(revoked, NOW)
    _, good = store.create_preauth_key(False, NOW + HOUR, now=NOW)
    wrong_secret = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    unknown_id = "mpk-999-" + good.split("-", 2)[2]
    for bad in (
        wrong_secret,
        unknown_id,
        "mpk-1-short",
        "hunter2",
        "",
        "mpk-99999999999999999999-x",
    ):
        with pytest.raises(KeyInvalid):
            store.use_preauth_key(bad, NOW)
    assert issubclass(KeyInvalid, AuthKeyError) and issubclass(AuthKeyError, StoreError)
    assert store.use_preauth_key(good, NOW).used == 1  # failed attempts did not use it
    with pytest.raises(NotFound):
        store.revoke_preauth_key(12345)


def test_preauth_secret_is_stored_only_hashed(store: Store, db_url: str) -> None:
    _, secret = store.create_preauth_key(False, NOW + HOUR, now=NOW)
    raw = store.list_preauth_keys()[0]
    secret_bytes = base64.urlsafe_b64decode(secret.split("-", 2)[2] + "=")
    rows = raw_rows(store, "preauth_keys")
    assert secret not in repr(rows) and secret_bytes not in repr(rows).encode()
    assert any(hashlib.sha256(secret_bytes).digest() in map(bytes_or_none, row) for row in rows)
    assert secret not in repr(raw)
    if store.db.dialect == "sqlite":
        files = [p for p in Path(db_url).parent.iterdir() if p.name.startswith("control.db")]
        for path in files:
            content = path.read_bytes()
            assert secret.encode() not in content and secret_bytes not in content, path


def bytes_or_none(value: object) -> bytes | None:
    return bytes(value) if isinstance(value, bytes | memoryview) else None


def test_preauth_single_use_key_admits_once_under_concurrency(
    open_stores: Callable[[], Store],
) -> None:
    threads = 8
    stores = [open_stores() for _ in range(threads)]
    _, secret = stores[0].create_preauth_key(False, NOW + HOUR, now=NOW)
    start = threading.Barrier(threads)

    def worker(store: Store) -> str:
        start.wait()
        try:
            store.use_preauth_key(secret, NOW)
        except KeyUsed:
            return "used"
        return "admitted"

    with ThreadPoolExecutor(threads) as pool:
        outcomes = sorted(pool.map(worker, stores))
    assert outcomes == ["admitted"] + ["used"] * (threads - 1)


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


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_store_postgres_reconnects_after_losing_its_connection(store: Store, pg_cluster: PgCluster) -> None:
    node = register(store)
    row = store.db.run(lambda tx: tx.one("SELECT pg_backend_pid()"), write=False)
    assert row is not None
    with pg_cluster.admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
    with pytest.raises(StoreUnavailable):
        store.get_node(node.id)
    assert store.get_node(node.id) == node


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

"""The control store against real databases: opening and migrating them, losing the
connection, and pre-auth keys. Every test runs on SQLite and on PostgreSQL unless it
names one.

Node records (registration, addresses, devices, versions and tombstones) are tested
in test_store_nodes.py, which imports this file's helpers."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

import pytest

from appliance.base.keys import PrivateKey, PublicKey
from appliance.control import migrations
from appliance.control.store import (
    AuthKeyError,
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    KeyUsed,
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

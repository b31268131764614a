"""The control server's store: the mesh, its nodes and pre-auth keys.

`open_store(url_or_path)` gives a `Store` on SQLite (a path, or `sqlite:///path` as
SQLAlchemy spells it: three slashes relative, four absolute) or on PostgreSQL
(`postgresql://…`), with the schema migrated and the mesh created on first open.

Versions: `meta.mesh_version` counts peer-visible changes. Each one takes the
next version and stamps the node with it; a removed node, or a node key rotated
away, leaves a tombstone with its version. So `changes_since(v)` is two indexed
range reads, O(change) not O(mesh). `touch_last_seen` changes no version: it
happens all the time and no peer needs to hear of it.

Calls are synchronous and block on database I/O. A Store is thread-safe (one
connection, a lock around each transaction), so the asyncio server can call it
through `asyncio.to_thread`; calling it directly from the event loop stalls the
loop for one transaction (an fsync on SQLite). Stores opened on one database
from several threads or processes may write concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.control import store_devices, store_names, store_pending, store_preauth
from appliance.control.migrations import ensure_mesh, migrate, random_ula
from appliance.control.store_records import (
    NODE_COLUMNS,
    AuthKeyError,
    Changes,
    DeltaUnavailable,
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    KeyUsed,
    MeshFull,
    NameInvalid,
    NodeExists,
    NodeRecord,
    NodeState,
    NotFound,
    PreauthKey,
    Row,
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    Tombstone,
    TooManyPending,
    dump_endpoints,
    dump_lan_dns,
    dump_routes,
    dump_tags,
    name_base,
    node_from_row,
    pick_name,
    to_epoch,
    utcnow,
)
from appliance.control.store_sql import Database, Tx, connect
from appliance.wire.dnsname import LanDns
from appliance.wire.netmap import Mesh

# Node changes log at debug: the service logs them once, in its own words, with
# the request that caused them. Opening, creating and migrating log at info.
log = logging.getLogger(__name__)

_NODE_NAMES = tuple(NODE_COLUMNS.split(", "))
_SELECT_NODE = f"SELECT {NODE_COLUMNS} FROM nodes"
_BUMP = "UPDATE meta SET mesh_version = mesh_version + 1 WHERE id = 1 RETURNING mesh_version"


def open_store(url_or_path: str | Path) -> Store:
    db = connect(url_or_path)
    try:
        schema = migrate(db)
        mesh = ensure_mesh(db)
        if schema >= store_names.SCHEMA:
            store_names.backfill(db)
    except BaseException:
        db.close()
        raise
    log.info("%s: store open (%s), mesh %s %s", db.where, db.dialect, mesh.ipv4, mesh.ipv6)
    return Store(db, mesh)


class Store:
    def __init__(self, db: Database, mesh: Mesh) -> None:
        self.db = db
        self.mesh = mesh  # fixed at creation

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mesh_version(self) -> int:
        return self.db.run(_mesh_version, write=False)

    # --- reading nodes ---

    def _node_where(self, clause: str, *params: Any) -> NodeRecord | None:
        row = self.db.run(lambda tx: tx.one(f"{_SELECT_NODE} WHERE {clause}", *params), write=False)
        return None if row is None else node_from_row(self.mesh, row)

    def get_node(self, node_id: int) -> NodeRecord | None:
        return self._node_where("id = ?", node_id)

    def get_node_by_machine_key(self, key: PublicKey) -> NodeRecord | None:
        return self._node_where("machine_key = ?", key.raw)

    def get_node_by_node_key(self, key: PublicKey) -> NodeRecord | None:
        return self._node_where("node_key = ?", key.raw)

    def get_node_by_name(self, name: str) -> NodeRecord | None:
        return self._node_where("name = ?", name)

    def list_nodes(self) -> tuple[NodeRecord, ...]:
        rows = self.db.run(lambda tx: tx.all(f"{_SELECT_NODE} ORDER BY id"), write=False)
        return tuple(node_from_row(self.mesh, row) for row in rows)

    def changes_since(self, version: int) -> Changes:
        """Nodes changed and tombstones laid after `version`, up to `Changes.version`.

        Raises DeltaUnavailable when the caller must start over with a full map:
        tombstones it needs were pruned, or its version is not from this mesh."""

        def work(tx: Tx) -> Changes:
            now, floor = _one(tx, "SELECT mesh_version, delta_floor FROM meta WHERE id = 1")
            if not floor <= version <= now:
                raise DeltaUnavailable(f"no delta from version {version} (have {floor}..{now})")
            nodes = tx.all(f"{_SELECT_NODE} WHERE version > ? ORDER BY version", version)
            tombs = tx.all(
                "SELECT public_key, version FROM tombstones WHERE version > ? ORDER BY version",
                version,
            )
            return Changes(
                now,
                tuple(node_from_row(self.mesh, row) for row in nodes),
                tuple(Tombstone(PublicKey(bytes(key)), v) for key, v in tombs),
            )

        return self.db.run(work, write=False)

    # --- changing nodes ---

    def register_node(
        self,
        machine_key: PublicKey,
        node_key: PublicKey,
        hostname: str,
        state: NodeState = NodeState.PENDING,
        tags: Iterable[str] = (),
        key_expiry: datetime | None = None,
        *,
        now: datetime | None = None,
        source: str | None = None,
        pending_caps: tuple[int, int] | None = None,
    ) -> NodeRecord:
        """A new node with a unique name made from `hostname`.

        An approved node takes the next addresses and a new mesh version. A pending
        one takes neither (version 0: no delta ever carries it, nobody is woken):
        anonymous callers must not use up the range or wake the mesh; approve_node
        gives it both. `source` is where a pending registration came from;
        `pending_caps` (per source, in all) raise TooManyPending beyond them.

        Idempotent: the same machine and node key get the existing record back.
        A known machine with another node key, or a node key some other machine
        has, raises NodeExists (a rotation is rotate_node_key)."""
        created = to_epoch(now or utcnow())
        pending = NodeState(state) is NodeState.PENDING
        expiry = None if key_expiry is None else to_epoch(key_expiry)
        base = name_base(hostname)

        def work(tx: Tx) -> tuple[NodeRecord, bool]:
            rows = tx.all(
                f"{_SELECT_NODE} WHERE machine_key = ? OR node_key = ?",
                machine_key.raw,
                node_key.raw,
            )
            for node in (node_from_row(self.mesh, row) for row in rows):
                if node.machine_key == machine_key and node.node_key == node_key:
                    return node, False
                raise NodeExists(f"node {node.name} already has this machine key or node key")
            if pending and pending_caps is not None:
                store_pending.check_caps(tx, source, *pending_caps)
            if pending:
                version, address = 0, None
            else:
                address = store_pending.take_address(tx, self.mesh)
                version = _one(tx, _BUMP)[0]
            # Names are few per base; LIKE's pattern is bound, and a base is only
            # [a-z0-9-], so it holds no wildcard.
            taken = tx.all("SELECT name FROM nodes WHERE name = ? OR name LIKE ?", base, base + "-%")
            name = pick_name(base, (row[0] for row in taken))
            # The key is back: its old tombstone would tell peers to drop it again.
            tx.run("DELETE FROM tombstones WHERE public_key = ?", node_key.raw)
            row = tx.one(
                "INSERT INTO nodes (machine_key, node_key, name, address_index, state, tags, "
                "advertised_routes, approved_routes, endpoints, created, last_seen, key_expiry, "
                "expiry_exempt, version, source) VALUES (?, ?, ?, ?, ?, ?, '[]', '[]', '[]', ?, NULL, "
                f"?, ?, ?, ?) RETURNING {NODE_COLUMNS}",
                machine_key.raw,
                node_key.raw,
                name,
                address,
                NodeState(state).value,
                dump_tags(tags),
                created,
                expiry,
                False,
                version,
                source if pending else None,
            )
            assert row is not None
            if not pending:
                label = store_names.take(tx, store_names.node_base(hostname, name), int(row[0]))
                row = tx.one(f"UPDATE nodes SET dns_name = ? WHERE id = ? RETURNING {NODE_COLUMNS}",
                             label, row[0])  # fmt: skip
                assert row is not None
            return node_from_row(self.mesh, row), True

        node, new = self.db.run(work, lock_meta=True)
        if new:
            log.debug("node %s registered (%s), %s", node.name, node.state, node.addresses)
        return node

    def _change(
        self,
        node_id: int,
        new_values: Callable[[Tx, NodeRecord], dict[str, Any]],
    ) -> NodeRecord:
        """Set the columns `new_values` asks for; a real change takes a new mesh version.

        Setting what is already there changes nothing and wakes no one: agents
        repeat their endpoints and routes on every start."""

        def work(tx: Tx) -> NodeRecord:
            row = tx.one(f"{_SELECT_NODE} WHERE id = ?{tx.for_update}", node_id)
            if row is None:
                raise NotFound(f"no node with id {node_id}")
            node, stored = node_from_row(self.mesh, row), dict(zip(_NODE_NAMES, row, strict=True))
            values = {k: v for k, v in new_values(tx, node).items() if stored[k] != v}
            if not values:
                return node
            (version,) = _one(tx, _BUMP)
            if "node_key" in values:
                # Peers that knew the old key must drop it from their WireGuard config.
                _bury(tx, node.node_key, version)
                tx.run("DELETE FROM tombstones WHERE public_key = ?", values["node_key"])
            values["version"] = version
            # Column names come from this module, never from the caller; values are bound.
            assignments = ", ".join(f"{column} = ?" for column in values)
            changed = tx.one(
                f"UPDATE nodes SET {assignments} WHERE id = ? RETURNING {NODE_COLUMNS}",
                *values.values(),
                node_id,
            )
            assert changed is not None
            return node_from_row(self.mesh, changed)

        return self.db.run(work, lock_meta=True)

    def add_device(self, node_id: int, name: str, public_key: PublicKey) -> NodeRecord:
        """Host a stock WireGuard client on the node, with the next addresses."""
        return self._change(node_id, store_devices.adding(self.mesh, name, public_key))

    def remove_device(self, node_id: int, public_key: PublicKey) -> NodeRecord:
        return self._change(node_id, store_devices.removing(public_key))

    def rename_device(self, node_id: int, public_key: PublicKey, name: str) -> NodeRecord:
        return self._change(node_id, store_devices.renaming(public_key, name))

    def approve_node(self, node_id: int) -> NodeRecord:
        """Approve the node; a node that registered pending gets its addresses now."""

        def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
            out: dict[str, Any] = {"state": NodeState.APPROVED.value}
            if node.address_index is None:
                out["address_index"] = store_pending.take_address(tx, self.mesh)
            if node.dns_name is None:  # a pending node holds no label: a flood of them could squat names
                out["dns_name"] = store_names.take(tx, store_names.node_base(node.name, "node"), node.id)
            return out

        return self._change(node_id, values)

    def rename_node(self, node_id: int, new_name: str) -> NodeRecord:
        """The node is now called `new_name`: its name and its DNS label follow (each
        made unique as at registration); NameInvalid when it makes no DNS label."""
        base, label_base = name_base(new_name), store_names.rename_base(new_name)

        def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
            taken = tx.all("SELECT name FROM nodes WHERE (name = ? OR name LIKE ?) AND id != ?",
                           base, base + "-%", node_id)  # fmt: skip
            store_names.release(tx, node.dns_name)
            out: dict[str, Any] = {"name": pick_name(base, (row[0] for row in taken))}
            if node.state is NodeState.APPROVED:
                out["dns_name"] = store_names.take(tx, label_base, node.id)
            return out

        node = self._change(node_id, values)
        log.debug("node %d is now %s (%s)", node_id, node.name, node.dns_name)
        return node

    def set_advertised_dns(self, node_id: int, offer: LanDns | None) -> NodeRecord:
        """The split DNS the node offers; peers see it while a route it serves holds the resolver."""
        text = dump_lan_dns(offer)
        return self._change(node_id, lambda _tx, _node: {"advertised_dns": text})

    def prune_pending(self, created_before: datetime) -> int:
        """Forget registrations nobody approved before `created_before`; how many."""
        return store_pending.prune(self.db, created_before)

    def set_endpoints(self, node_id: int, endpoints: Iterable[Endpoint]) -> NodeRecord:
        text = dump_endpoints(endpoints)
        return self._change(node_id, lambda _tx, _node: {"endpoints": text})

    def set_advertised_routes(self, node_id: int, routes: Iterable[IPNetwork]) -> NodeRecord:
        text = dump_routes(routes)
        return self._change(node_id, lambda _tx, _node: {"advertised_routes": text})

    def approve_routes(self, node_id: int, routes: Iterable[IPNetwork]) -> NodeRecord:
        """The routes an admin allows (the whole set); peers get approved ∩ advertised."""
        text = dump_routes(routes)
        return self._change(node_id, lambda _tx, _node: {"approved_routes": text})

    def set_expiry_exempt(self, node_id: int, exempt: bool) -> NodeRecord:
        return self._change(node_id, lambda _tx, _node: {"expiry_exempt": exempt})

    def expire_node_key(self, node_id: int, now: datetime | None = None) -> NodeRecord:
        """The node's key expires now: peers drop it until the node rotates."""
        when = to_epoch(now or utcnow())
        # An admin who expires a key means it, exemption or not.
        values = {"key_expiry": when, "expiry_exempt": False}
        return self._change(node_id, lambda _tx, _node: values)

    def rotate_node_key(
        self, node_id: int, new_key: PublicKey, key_expiry: datetime | None = None
    ) -> NodeRecord:
        """The node has a new WireGuard key, expiring at `key_expiry` (None: never);
        the old key gets a tombstone."""
        expiry = None if key_expiry is None else to_epoch(key_expiry)

        def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
            if node.node_key == new_key:
                return {"key_expiry": expiry}
            holder = tx.one("SELECT name FROM nodes WHERE node_key = ?", new_key.raw)
            if holder is not None:
                raise NodeExists(f"node {holder[0]} already has key {new_key.short}")
            return {"node_key": new_key.raw, "key_expiry": expiry}

        node = self._change(node_id, values)
        log.debug("node %s has key %s", node.name, node.node_key.short)
        return node

    def remove_node(self, node_id: int) -> Tombstone:
        """The node is gone; its addresses are never handed out again."""

        def work(tx: Tx) -> tuple[str, Tombstone]:
            row = tx.one(f"SELECT name, node_key, version FROM nodes WHERE id = ?{tx.for_update}", node_id)
            if row is None:
                raise NotFound(f"no node with id {node_id}")
            if row[2] == 0:
                # Pending since it registered: no peer ever heard of it, so nobody
                # needs a tombstone or a wake-up.
                tx.run("DELETE FROM nodes WHERE id = ?", node_id)
                return row[0], Tombstone(PublicKey(bytes(row[1])), 0)
            (version,) = _one(tx, _BUMP)
            tomb = _bury(tx, PublicKey(bytes(row[1])), version)
            store_names.release_node(tx, node_id)
            tx.run("DELETE FROM nodes WHERE id = ?", node_id)
            return row[0], tomb

        name, tomb = self.db.run(work, lock_meta=True)
        log.debug("node %s removed", name)
        return tomb

    def touch_last_seen(self, node_id: int, now: datetime | None = None) -> None:
        """Record that the node was heard from. No version: nobody is woken for it."""
        when = to_epoch(now or utcnow())
        changed = self.db.run(lambda tx: tx.run("UPDATE nodes SET last_seen = ? WHERE id = ?", when, node_id))
        if not changed:
            raise NotFound(f"no node with id {node_id}")

    def touch_last_seen_many(self, seen: Mapping[int, datetime]) -> None:
        """`touch_last_seen` for many nodes in one transaction (one fsync, not thousands).
        Nodes removed meanwhile are skipped."""
        rows = [(to_epoch(when), node_id) for node_id, when in seen.items()]

        def work(tx: Tx) -> None:
            for row in rows:
                tx.run("UPDATE nodes SET last_seen = ? WHERE id = ?", *row)

        if rows:
            self.db.run(work)

    def prune_tombstones(self, upto_version: int) -> int:
        """Forget tombstones at or below `upto_version`; clients older than it get a
        full map from then on. How many were dropped."""

        def work(tx: Tx) -> int:
            tx.run(
                "UPDATE meta SET delta_floor = ? WHERE id = 1 AND delta_floor < ?",
                upto_version,
                upto_version,
            )
            return tx.run("DELETE FROM tombstones WHERE version <= ?", upto_version)

        return self.db.run(work, lock_meta=True)

    # --- pre-auth keys ---

    def create_preauth_key(
        self,
        reusable: bool,
        expires_at: datetime,
        tags: Iterable[str] = (),
        *,
        now: datetime | None = None,
    ) -> tuple[PreauthKey, str]:
        """A new key, and its secret text `mpk-<id>-<secret>`: shown once, stored hashed."""
        return store_preauth.create(self.db, reusable, expires_at, tags, now or utcnow())

    def use_preauth_key(self, secret_text: str, now: datetime) -> PreauthKey:
        """Check the key and count one use, atomically; KeyInvalid, KeyRevoked,
        KeyExpired or KeyUsed (all AuthKeyError) when it does not admit a node."""
        return store_preauth.use(self.db, secret_text, now)

    def list_preauth_keys(self) -> tuple[PreauthKey, ...]:
        return store_preauth.list_all(self.db)

    def revoke_preauth_key(self, key_id: int) -> PreauthKey:
        return store_preauth.revoke(self.db, key_id)


def _one(tx: Tx, sql: str, *params: Any) -> Row:
    row = tx.one(sql, *params)
    assert row is not None, sql
    return row


def _mesh_version(tx: Tx) -> int:
    return int(_one(tx, "SELECT mesh_version FROM meta WHERE id = 1")[0])


def _bury(tx: Tx, key: PublicKey, version: int) -> Tombstone:
    tx.run(
        "INSERT INTO tombstones (public_key, version) VALUES (?, ?) "
        "ON CONFLICT (public_key) DO UPDATE SET version = excluded.version",
        key.raw,
        version,
    )
    return Tombstone(key, version)


# Callers import the store's whole vocabulary from here.
__all__ = [
    "AuthKeyError",
    "Changes",
    "DeltaUnavailable",
    "KeyExpired",
    "KeyInvalid",
    "KeyRevoked",
    "KeyUsed",
    "MeshFull",
    "NameInvalid",
    "NodeExists",
    "NodeRecord",
    "NodeState",
    "NotFound",
    "PreauthKey",
    "SchemaTooNew",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreUnavailable",
    "Tombstone",
    "TooManyPending",
    "open_store",
    "random_ula",
]

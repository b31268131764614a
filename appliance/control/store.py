"""The control server's store: the mesh, its nodes and pre-auth keys.

`open_store(url_or_path)` gives a `Store` on SQLite (a path, or `sqlite:///path` as
SQLAlchemy spells it: three slashes relative, four absolute) or on PostgreSQL
(`postgresql://…`), with the schema migrated and the mesh created on first open.

Versions: `meta.mesh_version` counts peer-visible changes. Each one takes the
next version and stamps the node with it; a removed node, or a node key rotated
away, leaves a tombstone with its version (store_versions.py). So
`changes_since(v)` is two indexed range reads, O(change) not O(mesh).
`touch_last_seen` changes no version: it happens all the time and no peer needs
to hear of it. Edits to a node (devices, names, routes, keys) are the
`NodeEdits` mixin (store_edits.py).

Calls are synchronous and block on database I/O. A Store is thread-safe (one
connection, a lock around each transaction), so the asyncio server can call it
through `asyncio.to_thread`; calling it directly from the event loop stalls the
loop for one transaction (an fsync on SQLite). Stores opened on one database
from several threads or processes may write concurrently.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.base.keys import PublicKey
from appliance.control import store_names, store_pending, store_preauth, store_versions
from appliance.control.migrations import ensure_mesh, migrate, random_ula
from appliance.control.store_edits import NodeEdits
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
    SchemaTooNew,
    StoreCorrupt,
    StoreError,
    StoreUnavailable,
    Tombstone,
    TooManyPending,
    dump_tags,
    name_base,
    node_from_row,
    pick_name,
    to_epoch,
    utcnow,
)
from appliance.control.store_sql import Database, Tx, connect
from appliance.wire.netmap import Mesh

# Node changes log at debug: the service logs them once, in its own words, with
# the request that caused them. Opening, creating and migrating log at info.
log = logging.getLogger(__name__)

_SELECT_NODE = f"SELECT {NODE_COLUMNS} FROM nodes"


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


class Store(NodeEdits):
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
        return self.db.run(store_versions.mesh_version, write=False)

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
        return self.db.run(lambda tx: store_versions.changes_since(tx, self.mesh, version), write=False)

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
                version = store_versions.bump(tx)
            # Names are few per base; LIKE's pattern is bound, and a base is only
            # [a-z0-9-], so it holds no wildcard.
            taken = tx.all("SELECT name FROM nodes WHERE name = ? OR name LIKE ?", base, base + "-%")
            name = pick_name(base, (row[0] for row in taken))
            store_versions.unbury(tx, node_key.raw)
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
            version = store_versions.bump(tx)
            tomb = store_versions.bury(tx, PublicKey(bytes(row[1])), version)
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
        return self.db.run(lambda tx: store_versions.prune_tombstones(tx, upto_version), lock_meta=True)

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

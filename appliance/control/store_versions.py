"""The mesh version and tombstones, in the store: how peers hear of changes as deltas.

`meta.mesh_version` counts peer-visible changes: each one takes the next version
(`bump`) and stamps the changed node with it. A removed node, or a node key rotated
away, leaves a tombstone with its version (`bury`). So `changes_since(v)` is two
indexed range reads, O(change) not O(mesh); `prune_tombstones` raises the floor
below which a caller must start over with a full map.

Apart from store.py because it is the one place that knows how a change becomes
a delta; the Store's writes only call `bump` and `bury`.
"""

from __future__ import annotations

from typing import Any

from appliance.base.keys import PublicKey
from appliance.control.store_records import (
    NODE_COLUMNS,
    Changes,
    DeltaUnavailable,
    Row,
    Tombstone,
    node_from_row,
)
from appliance.control.store_sql import Tx
from appliance.wire.netmap import Mesh

_BUMP = "UPDATE meta SET mesh_version = mesh_version + 1 WHERE id = 1 RETURNING mesh_version"


def _one(tx: Tx, sql: str, *params: Any) -> Row:
    row = tx.one(sql, *params)
    assert row is not None, sql
    return row


def bump(tx: Tx) -> int:
    """The next mesh version, taken for one peer-visible change."""
    return int(_one(tx, _BUMP)[0])


def mesh_version(tx: Tx) -> int:
    return int(_one(tx, "SELECT mesh_version FROM meta WHERE id = 1")[0])


def bury(tx: Tx, key: PublicKey, version: int) -> Tombstone:
    tx.run(
        "INSERT INTO tombstones (public_key, version) VALUES (?, ?) "
        "ON CONFLICT (public_key) DO UPDATE SET version = excluded.version",
        key.raw,
        version,
    )
    return Tombstone(key, version)


def unbury(tx: Tx, key: bytes) -> None:
    """The key is back: its old tombstone would tell peers to drop it again."""
    tx.run("DELETE FROM tombstones WHERE public_key = ?", key)


def changes_since(tx: Tx, mesh: Mesh, version: int) -> Changes:
    """Nodes changed and tombstones laid after `version`, up to `Changes.version`;
    DeltaUnavailable when tombstones it needs were pruned, or it is not from this mesh."""
    now, floor = _one(tx, "SELECT mesh_version, delta_floor FROM meta WHERE id = 1")
    if not floor <= version <= now:
        raise DeltaUnavailable(f"no delta from version {version} (have {floor}..{now})")
    nodes = tx.all(f"SELECT {NODE_COLUMNS} FROM nodes WHERE version > ? ORDER BY version", version)
    tombs = tx.all(
        "SELECT public_key, version FROM tombstones WHERE version > ? ORDER BY version",
        version,
    )
    return Changes(
        now,
        tuple(node_from_row(mesh, row) for row in nodes),
        tuple(Tombstone(PublicKey(bytes(key)), v) for key, v in tombs),
    )


def prune_tombstones(tx: Tx, upto_version: int) -> int:
    """Forget tombstones at or below `upto_version` (the delta floor rises to it)."""
    tx.run(
        "UPDATE meta SET delta_floor = ? WHERE id = 1 AND delta_floor < ?",
        upto_version,
        upto_version,
    )
    return tx.run("DELETE FROM tombstones WHERE version <= ?", upto_version)

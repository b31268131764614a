"""Registrations waiting for approval, in the store: what an anonymous caller may
leave behind, and how little that is (see limits.py for the caps).

A pending node has no address (`address_index` NULL) and version 0, so no delta
ever carries it; approval hands it the next address. Pending rows remember their
`source` for the per-source cap, and go when nobody approves them in time.
"""

from __future__ import annotations

from datetime import datetime

from appliance.control.store_records import MeshFull, TooManyPending, last_index, to_epoch
from appliance.control.store_sql import Database, Tx
from appliance.wire.netmap import Mesh


def take_address(tx: Tx, mesh: Mesh) -> int:
    """The next address index, counted as handed out (never again)."""
    row = tx.one("SELECT next_address_index FROM meta WHERE id = 1")
    assert row is not None
    index = int(row[0])
    if index > last_index(mesh):
        raise MeshFull(f"all {index - 1} addresses of {mesh.ipv4} were handed out")
    tx.run("UPDATE meta SET next_address_index = ? WHERE id = 1", index + 1)
    return index


def check_caps(tx: Tx, source: str | None, per_source: int, total: int) -> None:
    """TooManyPending when one more pending registration (from `source`) is over a cap."""
    row = tx.one("SELECT COUNT(*) FROM nodes WHERE state = 'pending'")
    waiting = int(row[0]) if row else 0
    if waiting >= total:
        raise TooManyPending(f"{waiting} registrations already wait for approval (at most {total})")
    if source is not None:
        row = tx.one("SELECT COUNT(*) FROM nodes WHERE state = 'pending' AND source = ?", source)
        mine = int(row[0]) if row else 0
        if mine >= per_source:
            raise TooManyPending(
                f"{mine} registrations from {source} already wait for approval (at most {per_source})"
            )


def prune(db: Database, created_before: datetime) -> int:
    """Forget registrations still pending that were made before `created_before`
    (no peer ever saw them: no version, no tombstone). How many were dropped."""
    when = to_epoch(created_before)
    return db.run(lambda tx: tx.run("DELETE FROM nodes WHERE state = 'pending' AND created < ?", when))

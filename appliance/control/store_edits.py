"""Edits to a registered node, in the store: devices, names, routes, endpoints,
approval, key expiry and rotation.

Each edit only says which column values it wants; `_change` applies them in one
transaction and takes a new mesh version (store_versions.py) only when a value
really changes, so setting what is already there wakes no one (agents repeat
their endpoints and routes on every start). A mixin of `Store` (store.py), apart
from it because every edit goes through this one path, while registration,
removal and the reads each have their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint, IPNetwork
from appliance.control import store_devices, store_names, store_pending, store_versions
from appliance.control.store_records import (
    NODE_COLUMNS,
    NodeExists,
    NodeRecord,
    NodeState,
    NotFound,
    dump_endpoints,
    dump_lan_dns,
    dump_routes,
    name_base,
    node_from_row,
    pick_name,
    to_epoch,
    utcnow,
)
from appliance.control.store_sql import Database, Tx
from appliance.wire.dnsname import LanDns
from appliance.wire.netmap import Mesh

# At debug, as in store.py: the service logs each change once, with its request.
log = logging.getLogger(__name__)

_NODE_NAMES = tuple(NODE_COLUMNS.split(", "))


class NodeEdits:
    # Set by Store.__init__ (store.py).
    db: Database
    mesh: Mesh

    def _change(
        self,
        node_id: int,
        new_values: Callable[[Tx, NodeRecord], dict[str, Any]],
    ) -> NodeRecord:
        """Set the columns `new_values` asks for; a real change takes a new mesh version.

        Setting what is already there changes nothing and wakes no one: agents
        repeat their endpoints and routes on every start."""

        def work(tx: Tx) -> NodeRecord:
            row = tx.one(f"SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?{tx.for_update}", node_id)
            if row is None:
                raise NotFound(f"no node with id {node_id}")
            node, stored = node_from_row(self.mesh, row), dict(zip(_NODE_NAMES, row, strict=True))
            values = {k: v for k, v in new_values(tx, node).items() if stored[k] != v}
            if not values:
                return node
            version = store_versions.bump(tx)
            if "node_key" in values:
                # Peers that knew the old key must drop it from their WireGuard config.
                store_versions.bury(tx, node.node_key, version)
                store_versions.unbury(tx, values["node_key"])
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

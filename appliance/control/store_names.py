"""DNS labels in the store: one per approved node and per hosted device, unique
across both, made once and kept (wire/dnsname.py says how a label is made).

Every label held is a row of `dns_names` (label, owning node), whatever holds it:
the node itself (`nodes.dns_name`) or one of its devices (the devices JSON). A new
label is checked against all of them with one indexed read, and the primary key
is the backstop. A collision takes the lowest free `-N`, in the order names were
taken, so a name never changes because another node came or went. A node's labels
go with it (and may then be taken again).
"""

from __future__ import annotations

import json
import logging

from appliance.control.store_records import NameInvalid
from appliance.control.store_sql import Database, Tx
from appliance.wire.dnsname import BadName, label_from, label_or, unique_label

log = logging.getLogger(__name__)
SCHEMA = 4  # the schema version that brought names (migrations.py)


def take(tx: Tx, base: str, node_id: int) -> str:
    """The label `base`, or the lowest free `base-N`, now held by `node_id`."""
    # A base is only [a-z0-9-], so it holds no LIKE wildcard; the pattern is bound.
    rows = tx.all("SELECT label FROM dns_names WHERE label = ? OR label LIKE ?", base, base + "-%")
    label = unique_label(base, {str(row[0]) for row in rows})
    tx.run("INSERT INTO dns_names (label, node_id) VALUES (?, ?)", label, node_id)
    return label


def release(tx: Tx, label: str | None) -> None:
    if label is not None:
        tx.run("DELETE FROM dns_names WHERE label = ?", label)


def release_node(tx: Tx, node_id: int) -> None:
    """Every label the node held, its own and its devices'."""
    tx.run("DELETE FROM dns_names WHERE node_id = ?", node_id)


def node_base(hostname: str, name: str) -> str:
    """A node's label from its hostname (IDN kept as punycode), else from its name:
    registration never fails because of what a machine calls itself."""
    return label_or(hostname, name)


def device_base(name: str) -> str:
    """A device's label from the name its owner typed; NameInvalid says why not."""
    try:
        return label_from(name, "device name")
    except BadName as e:
        raise NameInvalid(str(e)) from None


def rename_base(name: str) -> str:
    try:
        return label_from(name, "name")
    except BadName as e:
        raise NameInvalid(str(e)) from None


def backfill(db: Database) -> int:
    """Labels for approved nodes and devices from before names (schema version 4),
    oldest first; one new mesh version stamps them, so every agent hears of them.
    How many nodes were given one."""

    def work(tx: Tx) -> int:
        rows = tx.all(
            "SELECT id, name, devices, version FROM nodes WHERE dns_name IS NULL AND state = 'approved' "
            "ORDER BY id"
        )
        if not rows:
            return 0
        bump = tx.one("UPDATE meta SET mesh_version = mesh_version + 1 WHERE id = 1 RETURNING mesh_version")
        assert bump is not None
        for node_id, name, devices_text, _version in rows:
            label = take(tx, label_or(str(name), "node"), int(node_id))
            devices = json.loads(devices_text)
            for device in devices:
                if "dns_name" not in device:
                    device["dns_name"] = take(tx, label_or(str(device["name"]), "device"), int(node_id))
            tx.run(
                "UPDATE nodes SET dns_name = ?, devices = ?, version = ? WHERE id = ?",
                label,
                json.dumps(devices),
                int(bump[0]),
                node_id,
            )
        return len(rows)

    named = db.run(work, lock_meta=True)
    if named:
        log.info("%s: gave DNS names to %d node(s) from before names", db.where, named)
    return named

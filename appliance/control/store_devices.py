"""Devices a node hosts: stock WireGuard clients (phones) behind a meshpi node.

A device has no machine key and runs no agent: its hub (the node that made it)
holds it as a WireGuard peer, and the rest of the mesh reaches it through the
hub. Control's part is the address: taken from the same counter as nodes' (in
the same transaction as the hub's new version), so it is never handed out twice,
and served as a route of the hub to every peer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from appliance.base.keys import PublicKey
from appliance.control import store_names
from appliance.control.store_records import (
    DeviceRecord,
    MeshFull,
    NodeExists,
    NodeRecord,
    NotFound,
    address_pair,
    dump_devices,
    last_index,
)
from appliance.control.store_sql import Tx
from appliance.wire.netmap import Mesh

MAX_DEVICES = 64  # per node: a household's phones and tablets, with room to spare


def adding(mesh: Mesh, name: str, public_key: PublicKey) -> Any:
    """The `new_values` of Store._change that hosts one more device on a node."""

    def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
        base = store_names.device_base(name)  # NameInvalid before anything is taken
        if any(d.name == name for d in node.devices):
            raise NodeExists(f"node {node.name} already has a device named {name!r}")
        if len(node.devices) >= MAX_DEVICES:
            raise NodeExists(f"node {node.name} already hosts {MAX_DEVICES} devices")
        taken = any(d.public_key == public_key for d in node.devices) or tx.one(
            "SELECT 1 FROM nodes WHERE node_key = ?", public_key.raw
        )
        if taken:
            raise NodeExists(f"key {public_key.short} is already in the mesh")
        row = tx.one("SELECT next_address_index FROM meta WHERE id = 1")
        assert row is not None
        index = int(row[0])
        if index > last_index(mesh):
            raise MeshFull(f"all {index - 1} addresses of {mesh.ipv4} were handed out")
        tx.run("UPDATE meta SET next_address_index = ? WHERE id = 1", index + 1)
        label = store_names.take(tx, base, node.id)
        device = DeviceRecord(name, public_key, index, *address_pair(mesh, index), label)
        return {"devices": dump_devices([*node.devices, device])}

    return values


def removing(public_key: PublicKey) -> Any:
    """The `new_values` of Store._change that drops a hosted device."""

    def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
        kept = [d for d in node.devices if d.public_key != public_key]
        if len(kept) == len(node.devices):
            raise NotFound(f"node {node.name} hosts no device with key {public_key.short}")
        for gone in node.devices:
            if gone.public_key == public_key:
                store_names.release(tx, gone.dns_name)
        return {"devices": dump_devices(kept)}

    return values


def renaming(public_key: PublicKey, name: str) -> Any:
    """The `new_values` of Store._change that gives a hosted device a new name."""

    base = store_names.device_base(name)  # NameInvalid before anything changes

    def values(tx: Tx, node: NodeRecord) -> dict[str, Any]:
        device = find(node, public_key)
        if any(d.name == name and d.public_key != public_key for d in node.devices):
            raise NodeExists(f"node {node.name} already has a device named {name!r}")
        # Its DNS name follows, as a node's does (made unique as when it was added).
        store_names.release(tx, device.dns_name)
        label = store_names.take(tx, base, node.id)
        renamed = [replace(d, name=name, dns_name=label) if d.public_key == public_key else d
                   for d in node.devices]  # fmt: skip
        return {"devices": dump_devices(renamed)}

    return values


def find(node: NodeRecord, public_key: PublicKey) -> DeviceRecord:
    for device in node.devices:
        if device.public_key == public_key:
            return device
    raise NotFound(f"node {node.name} hosts no device with key {public_key.short}")

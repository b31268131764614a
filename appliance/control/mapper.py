"""Store records → what one node is told about the mesh. Pure.

Every approved node whose key has not expired sees every other such node (no ACLs
yet). A peer entry carries only *served* routes: approved by an admin and still
advertised by the node. A full map is O(mesh); a delta is O(change).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from appliance.base.keys import PublicKey
from appliance.control.store_records import Changes, NodeRecord, NodeState
from appliance.wire.dnsname import DnsConfig, NamedDevice
from appliance.wire.mapdelta import delta_json
from appliance.wire.netmap import Mesh, Netmap, Node, netmap_json


def visible(record: NodeRecord, now: datetime) -> bool:
    return record.state is NodeState.APPROVED and not record.key_expired(now)


def wire_node(record: NodeRecord) -> Node:
    return Node(
        name=record.name,
        public_key=record.node_key,
        addresses=record.addresses,
        # The best candidate first; NAT traversal will choose among them later.
        endpoint=record.endpoints[0] if record.endpoints else None,
        routes=record.served_routes,
        endpoints=record.endpoints,
        dns_name=record.dns_name,
        devices=tuple(
            NamedDevice(d.dns_name, (d.ipv4, d.ipv6)) for d in record.devices if d.dns_name is not None
        ),
        lan_dns=record.served_lan_dns,
    )


def full_map(
    mesh: Mesh,
    viewer: NodeRecord,
    records: Iterable[NodeRecord],
    now: datetime,
    capver: int,
    dns: DnsConfig | None = None,
) -> dict[str, Any]:
    """In the capability version the viewer asked for (netmap.py's CAPVER)."""
    peers = tuple(wire_node(r) for r in records if r.id != viewer.id and visible(r, now))
    return netmap_json(Netmap(mesh, wire_node(viewer), peers, dns=dns), capver)


def delta(
    viewer: NodeRecord, changes: Changes, now: datetime, capver: int, dns: DnsConfig | None = None
) -> dict[str, Any]:
    """`dns` goes in every delta (it is O(1)): a control restarted with another
    domain is heard by agents with the next change, without a full map."""
    changed: list[Node] = []
    removed: list[PublicKey] = [t.public_key for t in changes.tombstones]
    self_node = None
    for record in changes.nodes:
        if record.id == viewer.id:
            self_node = wire_node(record)
        elif visible(record, now):
            changed.append(wire_node(record))
        else:
            removed.append(record.node_key)  # pending again, or its key expired
    return delta_json(changed, removed, self_node, capver, dns)

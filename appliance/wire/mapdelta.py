"""Netmaps on the wire: serialising them, and patching one with a delta.

Control sends a node its full netmap once, then only what changed (protocol v1,
`map`): `{"changed": [peer…], "removed": [public key…], "self": node?}`. The agent
patches its netmap with `apply_delta`, which checks the result as strictly as a
full netmap (parse_netmap), so a bad delta never reaches the planner.
"""

from __future__ import annotations

from typing import Any

from appliance.base.keys import PublicKey
from appliance.wire.fields import ConfigError, Fields, parse_public_key
from appliance.wire.netmap import Netmap, Node, parse_netmap


def node_json(node: Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "public_key": str(node.public_key),
        "addresses": [str(a) for a in node.addresses],
        "endpoint": None if node.endpoint is None else str(node.endpoint),
        "routes": [str(r) for r in node.routes],
    }


def netmap_json(netmap: Netmap) -> dict[str, Any]:
    return {
        "mesh": {"ipv4": str(netmap.mesh.ipv4), "ipv6": str(netmap.mesh.ipv6)},
        "self": node_json(netmap.self_node),
        "peers": [node_json(p) for p in netmap.peers],
    }


def delta_json(
    changed: list[Node], removed: list[PublicKey], self_node: Node | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "changed": [node_json(n) for n in changed],
        "removed": [str(k) for k in removed],
    }
    if self_node is not None:
        out["self"] = node_json(self_node)
    return out


def apply_delta(netmap: Netmap, delta: object, source: str = "delta") -> Netmap:
    """The netmap with the delta applied; raises ConfigError naming the bad field."""
    f = Fields(source, "", delta)
    changed: list[Any] = f.get("changed", _list, [])
    removed = set(f.get_list("removed", parse_public_key))
    self_entry = f.get("self", _any, None)
    f.done()
    # Peers keep their order; changed ones replace in place, new ones go last.
    peers: dict[str, Any] = {
        str(p.public_key): node_json(p) for p in netmap.peers if p.public_key not in removed
    }
    for i, entry in enumerate(changed):
        key = entry.get("public_key") if isinstance(entry, dict) else None
        if not isinstance(key, str):
            raise ConfigError(source, f"changed[{i}].public_key", key, "is required")
        peers[key] = entry
    doc = netmap_json(netmap)
    doc["peers"] = list(peers.values())
    if self_entry is not None:
        doc["self"] = self_entry
    return parse_netmap(doc, source)


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("must be a list")
    return value


def _any(value: object) -> object:
    return value

"""Netmap deltas: what changed since the version a node has (protocol v1, `map`).

`{"changed": [node…], "removed": [public key…], "self": node?}`, plus the
`capver`/`optional` fields of netmap.py from capability version 2, and the mesh's
`dns` settings from version 3 (O(1); they replace the netmap's when present). The agent
parses a delta into a typed `MapDelta` (O(change): only the nodes in it) and
patches its typed netmap with `apply_delta`, which checks every changed node as
strictly as a full netmap (unique keys, names and addresses; inside the mesh) —
without re-parsing or re-rendering the nodes that did not change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from appliance.base.keys import PublicKey
from appliance.wire.dnsname import DnsConfig
from appliance.wire.fields import Fields, parse_public_key
from appliance.wire.netmap import (
    CAPVER,
    Mesh,
    Netmap,
    Node,
    PeerList,
    dns_json,
    node_json,
    parse_dns,
    parse_node,
    read_version,
    version_fields,
)


@dataclass(frozen=True)
class MapDelta:
    changed: tuple[Node, ...] = ()
    removed: tuple[PublicKey, ...] = ()
    self_node: Node | None = None
    dns: DnsConfig | None = None  # the mesh's DNS settings (capver 3), None: as they were

    @property
    def empty(self) -> bool:
        return not self.changed and not self.removed and self.self_node is None and self.dns is None


def delta_json(
    changed: list[Node],
    removed: list[PublicKey],
    self_node: Node | None = None,
    capver: int = CAPVER,
    dns: DnsConfig | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        **version_fields(capver),
        "changed": [node_json(n, capver) for n in changed],
        "removed": [str(k) for k in removed],
    }
    if self_node is not None:
        out["self"] = node_json(self_node, capver)
    return out | dns_json(dns, capver)


def parse_delta(obj: object, mesh: Mesh, source: str = "delta") -> MapDelta:
    """A typed delta; raises ConfigError naming the bad field."""
    f = Fields(source, "", obj)
    optional = f.optional = read_version(f)
    raw_changed: list[Any] = f.get("changed", _list, [])
    changed = tuple(parse_node(source, f"changed[{i}]", n, mesh, optional) for i, n in enumerate(raw_changed))
    removed = f.get_list("removed", parse_public_key)
    raw_self = f.get("self", _any, None)
    self_node = None if raw_self is None else parse_node(source, "self", raw_self, mesh, optional)
    dns = parse_dns(f)
    f.done()
    return MapDelta(changed, removed, self_node, dns)


def apply_delta(netmap: Netmap, delta: MapDelta, source: str = "delta") -> Netmap:
    """The netmap with the delta applied, in O(change). Peers keep their order;
    changed ones replace in place, new ones go last. Raises ConfigError naming
    the field (and then the netmap is as it was)."""
    assert netmap.index is not None
    index = netmap.index.copy()
    touched: set[PublicKey] = set()
    with index.editing():
        for key in delta.removed:
            if key in index.peers:
                index.remove(key)
                touched.add(key)
        if delta.self_node is not None:
            index.set_me(source, delta.self_node)
        for i, node in enumerate(delta.changed):
            index.put(source, f"changed[{i}]", node)
            touched.add(node.public_key)
    origin = (weakref.ref(netmap), frozenset(touched))
    dns = netmap.dns if delta.dns is None else delta.dns
    return Netmap(netmap.mesh, index.me, PeerList(index), index, origin, dns)


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("must be a list")
    return value


def _any(value: object) -> object:
    return value


def patched(netmap: Netmap, obj: object, source: str = "delta") -> Netmap:
    """Parse a delta as it came on the wire and apply it (a simulated agent's step)."""
    return apply_delta(netmap, parse_delta(obj, netmap.mesh, source), source)

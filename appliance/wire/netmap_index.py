"""Who holds each key, name and address in a netmap: the index a full map builds
once and each delta carries forward (mapdelta.py).

Apart from netmap.py (the types and their JSON) because this is the machinery that
keeps a delta O(change): persistent maps (HAMTs, `immutables`), copied in O(1)
and changed in O(log n), so a delta to a mesh of 5,000 costs what it costs at 100.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from immutables import Map

from appliance.base.keys import PublicKey
from appliance.wire.fields import ConfigError

if TYPE_CHECKING:
    from appliance.wire.netmap import Node


class Index:
    """Who holds each key, name and address: built once per full map and
    carried forward by deltas (mapdelta.py), so a delta is checked in O(change).

    Persistent maps (HAMTs): a copy is O(1) and a change O(log n), so a delta to
    a mesh of 5,000 costs what it costs at 100; the netmap a delta was applied to
    stays as it was. `order` keeps the netmap's order: a replaced peer keeps its
    place, a new one goes last. Edit through `editing()`, which ends frozen."""

    def __init__(
        self,
        me: Node,
        peers: Map[PublicKey, Node],
        owner_of: Map[object, PublicKey],
        order: Map[PublicKey, int],
        seq: int,
    ) -> None:
        self.me, self.peers, self.owner_of, self.order, self.seq = me, peers, owner_of, order, seq

    @classmethod
    def build(cls, source: str, me: Node, peers: tuple[Node, ...]) -> Index:
        index = cls(me, Map(), Map(), Map(), 0)
        with index.editing():
            index._claim(source, "self", me)
            for i, node in enumerate(peers):
                index.put(source, f"peers[{i}]", node, replace=False)
        return index

    def copy(self) -> Index:
        return Index(self.me, self.peers, self.owner_of, self.order, self.seq)

    @contextmanager
    def editing(self) -> Iterator[None]:
        """Batch the changes inside on mutable views; frozen again at the end,
        whether or not they raised (a refused delta leaves a copy, not the original)."""
        peers, owner_of, order = self.peers.mutate(), self.owner_of.mutate(), self.order.mutate()
        self.peers, self.owner_of, self.order = peers, owner_of, order  # type: ignore[assignment]
        try:
            yield
        finally:
            self.peers, self.owner_of, self.order = peers.finish(), owner_of.finish(), order.finish()

    def node(self, key: PublicKey) -> Node | None:
        return self.me if key == self.me.public_key else self.peers.get(key)

    def ordered_peers(self) -> tuple[Node, ...]:
        """The peers in the netmap's order: O(n log n), for readers of the whole map."""
        rank = self.order
        return tuple(sorted(self.peers.values(), key=lambda n: rank[n.public_key]))

    def put(self, source: str, path: str, node: Node, replace: bool = True) -> None:
        """Add a peer, or replace the one with its key (in place) if `replace`."""
        key = node.public_key
        old = self.peers.get(key)
        if old is not None and not replace:
            self._claim(source, path, node)  # names the clash: the name, else the key below
            raise ConfigError(source, f"{path}.public_key", str(key), f"is already used by {old.name}")
        if old is not None:
            self._unclaim(old)
        elif key == self.me.public_key:
            raise ConfigError(source, f"{path}.public_key", str(key), f"is already used by {self.me.name}")
        try:
            self._claim(source, path, node)
        except ConfigError:
            if old is not None:
                self._claim(source, path, old)
            raise
        self.peers[key] = node  # type: ignore[index]
        if old is None:
            self.order[key] = self.seq  # type: ignore[index]
            self.seq += 1

    def set_me(self, source: str, node: Node) -> None:
        if node.public_key in self.peers:
            other = self.peers[node.public_key].name
            raise ConfigError(source, "self.public_key", str(node.public_key), f"is already used by {other}")
        self._unclaim(self.me)
        self._claim(source, "self", node)
        self.me = node

    def remove(self, key: PublicKey) -> None:
        node = self.peers.get(key)
        if node is not None:
            del self.peers[key]  # type: ignore[attr-defined]
            del self.order[key]  # type: ignore[attr-defined]
            self._unclaim(node)

    def _claim(self, source: str, path: str, node: Node) -> None:
        for fieldname, value in _claims(node):
            holder = self.owner_of.get(value)
            if holder is not None:
                other = self.node(holder)
                shown = node.name if fieldname == "name" else str(value)
                reason = f"is already used by {other.name if other else holder}"
                raise ConfigError(source, f"{path}.{fieldname}", shown, reason)
        for _field, value in _claims(node):
            self.owner_of[value] = node.public_key  # type: ignore[index]

    def _unclaim(self, node: Node) -> None:
        for _field, value in _claims(node):
            if self.owner_of.get(value) == node.public_key:
                del self.owner_of[value]  # type: ignore[attr-defined]


def _claims(node: Node) -> list[tuple[str, object]]:
    return [("name", ("name", node.name))] + [(f"addresses[{i}]", a) for i, a in enumerate(node.addresses)]

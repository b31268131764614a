"""Full maps encoded once per mesh version and shared by every node that asks.

A full map is O(mesh): 5,000 nodes reconnecting at once after a restart each want
one. Encoding 5,000 peers for each of them is O(mesh^2) work (~80 ms a map, ~400 s
for all). But every viewer sees the same peers (mapper.visible: approved, key not
expired; there are no ACLs yet) except itself, so the work splits:

- shared, once per (mesh version, capability version): each visible node's entry as
  canonical JSON (re-encoded only when its record changed), the map's fixed fields,
  and, for agents that read compressed answers (capver 4, wire/mapzip.py), the peer
  list deflated in chunks of CHUNK entries;
- per node: cutting its own entry out of the peer list (the chunk that held it goes
  as a stored block, no compression), its `self` entry and the request's `re`.

The plaintext is byte for byte what the per-node path made (seal.encode_json of
mapper.full_map; tests/unit/test_mapcache.py compares them for every viewer), so
what a node sees is decided in one place, mapper.py, and an old agent gets the same
uncompressed answer it always had. Time matters too: a key that expires between
two versions changes who is visible, so a shared encoding also holds the span of
time in which it is right. Should views ever differ per node (ACLs), the shared
part is keyed by the view, never built from one node's records for another.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nacl.public import Box

from appliance.control import mapper
from appliance.control.store_records import NodeRecord
from appliance.wire import mapzip
from appliance.wire.dnsname import DnsConfig
from appliance.wire.netmap import CAPVER, Mesh, Netmap, netmap_json, node_json
from appliance.wire.seal import b64, encode_json

CHUNK = 64  # peers per deflated chunk: ~10 KiB, what a node's own chunk costs it unpacked
# Where the per-node parts go in the shared template. JSON escapes NUL, so no real
# field value can spell these.
_PEERS, _SELF, _RE = "\x00peers", "\x00self", "\x00re"
_HOLES = {json.dumps(m).encode(): m for m in (_PEERS, _SELF, _RE)}


@dataclass
class Shared:
    """One mesh version's full map in one capability version, minus the per-node parts."""

    version: int
    capver: int
    dns: DnsConfig | None
    valid: tuple[datetime | None, datetime | None]  # [from, until) in which visibility holds
    segments: list[tuple[bytes, str | None]]  # literal, then the hole after it (or None)
    entries: list[bytes]  # each visible node's entry, in the map's order
    position: dict[int, int]  # node id -> index in entries
    text: bytes = b""  # entries joined by commas
    starts: list[int] = field(default_factory=list)
    chunks: list[bytes] | None = None  # deflated, made when a compressed answer is first asked
    literals: list[bytes] | None = None

    def holds(self, version: int, capver: int, dns: DnsConfig | None, now: datetime) -> bool:
        lo, hi = self.valid
        return (
            (self.version, self.capver, self.dns) == (version, capver, dns)
            and (lo is None or now >= lo)
            and (hi is None or now < hi)
        )

    def peers_parts(self, me: int | None) -> list[memoryview]:
        """The peer list's inside without entry `me`, as views of the shared text
        (a map is ~800 KiB at 5,000 nodes: no copy but the one that joins them)."""
        text = memoryview(self.text)
        if me is None:
            return [text]
        start, end = self.starts[me], self.starts[me] + len(self.entries[me])
        if me + 1 < len(self.entries):
            return [text[:start], text[end + 1 :]]  # its comma after it goes too
        return [text[: max(0, start - 1)]]  # the last one: the comma before it


class MapCache:
    """The current Shared per capability version, and the entries and chunks that
    outlive a version because their nodes did not change."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self._shared: dict[int, Shared] = {}
        self._entries: dict[tuple[int, int], tuple[NodeRecord, bytes]] = {}  # (capver, id)
        self._chunks: dict[tuple[int, int], tuple[list[bytes], bytes]] = {}  # (capver, chunk no)
        self.builds = 0  # how often a shared encoding was made (tests, metrics)

    def full(
        self,
        mesh: Mesh,
        viewer: NodeRecord,
        version: int,
        records: Iterable[NodeRecord],
        now: datetime,
        capver: int,
        dns: DnsConfig | None,
    ) -> FullMap:
        """`viewer`'s full map at `version`; `records` are the mesh's nodes at it."""
        capver = min(capver, CAPVER)
        shared = self._shared.get(capver)
        if shared is None or not shared.holds(version, capver, dns, now):
            shared = self._shared[capver] = self._build(mesh, viewer, version, records, now, capver, dns)
        me = shared.position.get(viewer.id)
        if me is not None:
            own = shared.entries[me]
        else:  # not visible to itself (cannot happen for a node allowed a map): the slow way
            own = encode_json(node_json(mapper.wire_node(viewer), capver))
        return FullMap(shared, me, own, self)

    def _build(
        self,
        mesh: Mesh,
        viewer: NodeRecord,
        version: int,
        records: Iterable[NodeRecord],
        now: datetime,
        capver: int,
        dns: DnsConfig | None,
    ) -> Shared:
        self.builds += 1
        entries: list[bytes] = []
        position: dict[int, int] = {}
        cache: dict[tuple[int, int], tuple[NodeRecord, bytes]] = {}
        lo: datetime | None = None
        hi: datetime | None = None
        for r in records:
            if not r.expiry_exempt and r.key_expiry is not None:
                if r.key_expiry <= now:
                    lo = r.key_expiry if lo is None else max(lo, r.key_expiry)
                else:
                    hi = r.key_expiry if hi is None else min(hi, r.key_expiry)
            if not mapper.visible(r, now):
                continue
            known = self._entries.get((capver, r.id))
            entry = (
                known[1]
                if known is not None and known[0] is r
                else encode_json(node_json(mapper.wire_node(r), capver))
            )
            cache[(capver, r.id)] = (r, entry)
            position[r.id] = len(entries)
            entries.append(entry)
        for k in [k for k in self._entries if k[0] == capver]:
            del self._entries[k]
        self._entries.update(cache)
        # The template: the map as mapper renders it, with markers where per-node parts go.
        body = netmap_json(Netmap(mesh, mapper.wire_node(viewer), (), dns=dns), capver)
        body["peers"], body["self"] = [_PEERS], _SELF
        template = encode_json({"re": _RE, "body": {"version": version, "full": body}})
        shared = Shared(version, capver, dns, (lo, hi), _segments(template), entries, position)
        starts, at = [], 0
        for entry in entries:
            starts.append(at)
            at += len(entry) + 1
        shared.text, shared.starts = b",".join(entries), starts
        return shared

    def deflated(self, shared: Shared) -> tuple[list[bytes], list[bytes]]:
        """The shared literals and peer chunks, deflated (once per version; a chunk
        whose entries did not change keeps its bytes from the version before)."""
        if shared.chunks is None or shared.literals is None:
            shared.literals = [mapzip.deflate_piece(lit) for lit, _hole in shared.segments]
            chunks, n, k = [], len(shared.entries), self.chunk
            for c in range((n + k - 1) // k):
                part = shared.entries[c * k : (c + 1) * k]
                known = self._chunks.get((shared.capver, c))
                if (
                    known is not None
                    and len(known[0]) == len(part)
                    and all(a is b for a, b in zip(known[0], part, strict=True))
                ):
                    chunks.append(known[1])
                    continue
                z = mapzip.deflate_piece((b"," if c else b"") + b",".join(part))
                self._chunks[(shared.capver, c)] = (part, z)
                chunks.append(z)
            for key in [key for key in self._chunks if key[0] == shared.capver and key[1] >= len(chunks)]:
                del self._chunks[key]
            shared.chunks = chunks
        return shared.literals, shared.chunks


def _segments(template: bytes) -> list[tuple[bytes, str | None]]:
    found = sorted((template.index(marker), marker) for marker in _HOLES)
    out: list[tuple[bytes, str | None]] = []
    at = 0
    for pos, marker in found:
        out.append((template[at:pos], _HOLES[marker]))
        at = pos + len(marker)
    out.append((template[at:], None))
    return out


class FullMap(Mapping[str, Any]):
    """One node's full map. As a Mapping it is the map's JSON (decoded when first
    read: tests, in-process callers); app.py seals it with `sealed`, which never
    decodes it."""

    def __init__(self, shared: Shared, me: int | None, own: bytes, cache: MapCache) -> None:
        self.shared, self.me, self.own, self.cache = shared, me, own, cache
        self._decoded: dict[str, Any] | None = None

    @property
    def version(self) -> int:
        return self.shared.version

    @property
    def compressed(self) -> bool:
        return self.shared.capver >= mapzip.COMPRESS_CAPVER

    def _fill(self, hole: str, re: str) -> bytes:
        return self.own if hole == _SELF else b'"' + re.encode() + b'"'

    def plaintext(self, re: str) -> bytes:
        """The answer's plaintext for the request whose nonce is `re` (base64)."""
        parts: list[bytes | memoryview] = []
        for literal, hole in self.shared.segments:
            parts.append(literal)
            if hole == _PEERS:
                parts += self.shared.peers_parts(self.me)
            elif hole is not None:
                parts.append(self._fill(hole, re))
        return b"".join(parts)

    def packed(self, re: str) -> bytes:
        """The plaintext compressed (wire/mapzip.py), from the shared deflated pieces."""
        literals, chunks = self.cache.deflated(self.shared)
        pieces, length = [], 0
        for (literal, hole), z in zip(self.shared.segments, literals, strict=True):
            pieces.append(z)
            length += len(literal)
            if hole == _PEERS:
                peers = self._peer_pieces(chunks)
                pieces += peers[0]
                length += peers[1]
            elif hole is not None:
                text = self._fill(hole, re)
                pieces.append(mapzip.stored_piece(text))
                length += len(text)
        return mapzip.frame(length, pieces)

    def _peer_pieces(self, chunks: list[bytes]) -> tuple[list[bytes], int]:
        entries, k, me = self.shared.entries, self.cache.chunk, self.me
        pieces, emitted = [], False
        for c, z in enumerate(chunks):
            lo, hi = c * k, min(len(entries), (c + 1) * k)
            if me is not None and lo <= me < hi:
                items = entries[lo:me] + entries[me + 1 : hi]
                if items:  # this node's own chunk, without it: stored, no compression
                    pieces.append(mapzip.stored_piece((b"," if emitted else b"") + b",".join(items)))
                    emitted = True
            elif c and not emitted:  # only its own entry came before: no leading comma
                pieces.append(mapzip.stored_piece(b",".join(entries[lo:hi])))
                emitted = True
            else:
                pieces.append(z)
                emitted = True
        length = len(self.shared.text)
        if me is not None:  # its entry and one comma (none when it was the only one)
            length = max(0, length - len(entries[me]) - 1)
        return pieces, length

    def body(self, request_nonce: bytes) -> bytes:
        """What is sealed: compressed for an agent that reads it (capver 4)."""
        re = b64(request_nonce)
        return self.packed(re) if self.compressed else self.plaintext(re)

    def sealed(self, box: Box, request_nonce: bytes) -> bytes:
        return bytes(box.encrypt(self.body(request_nonce)))

    # -- as a Mapping: the full map's JSON -------------------------------------------

    def _json(self) -> dict[str, Any]:
        if self._decoded is None:
            doc = json.loads(self.plaintext(""))
            self._decoded = doc["body"]["full"]
        return self._decoded

    def __getitem__(self, key: str) -> Any:
        return self._json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json())

    def __len__(self) -> int:
        return len(self._json())

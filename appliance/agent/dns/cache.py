"""The resolver's two small caches, both bounded, both used only from the server's
event-loop thread (no locks).

- AnswerCache: upstream answers by question, kept for their TTL (RFC 2308 for
  negative ones), least recently used dropped first.
- PacketCache: finished answers by the query's bytes after its ID (what PowerDNS calls
  a packet cache): a repeated query costs a dict look-up and a send. An entry is tied
  to the zone/upstreams generation it was made from and, for forwarded answers, to
  the second its TTLs were counted down for.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import dns.message

# Upstream answers are kept at most this long whatever their TTL says (a day, as most resolvers).
MAX_TTL = 86400
# Memory stays small whatever clients ask and upstreams answer (an upstream may send 64 KiB
# over TCP): the answer cache holds at most this much wire format (parsed, about ten times
# that in Python objects), the packet cache no queries or answers bigger than these.
MAX_ANSWER_BYTES = 1 << 20
MAX_QUERY_BYTES = 512
MAX_REPLY_BYTES = 4096

K = TypeVar("K")


@dataclass(frozen=True)
class Cached:
    message: dns.message.Message
    stored: float  # monotonic seconds
    expires: float
    size: int  # bytes of wire format


class AnswerCache(Generic[K]):
    def __init__(self, size: int = 1024, max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self._size, self._max_bytes = size, max_bytes
        self._bytes = 0
        self._entries: OrderedDict[K, Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: K, message: dns.message.Message, now: float, ttl: int) -> None:
        if ttl <= 0:
            return
        size = len(message.to_wire())
        if size > self._max_bytes // 16:
            return  # one answer may not push out the whole cache
        if key in self._entries:
            self._drop(key)
        self._entries[key] = Cached(message, now, now + min(ttl, MAX_TTL), size)
        self._bytes += size
        while len(self._entries) > self._size or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: K) -> None:
        self._bytes -= self._entries.pop(key).size

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


@dataclass(frozen=True)
class Packet:
    wire: bytes
    kind: str  # the stats counter a hit counts as
    generation: int
    until: float  # monotonic seconds


class PacketCache:
    def __init__(self, size: int = 2048) -> None:
        self._size = size
        self._entries: dict[tuple[bool, bytes], Packet] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[bool, bytes], now: float, generation: int) -> Packet | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.until <= now or entry.generation != generation:
            del self._entries[key]
            return None
        return entry

    def put(self, key: tuple[bool, bytes], packet: Packet) -> None:
        if len(key[1]) > MAX_QUERY_BYTES or len(packet.wire) > MAX_REPLY_BYTES:
            return
        if len(self._entries) >= self._size:
            # Oldest first (dicts keep insertion order): a flood of distinct queries
            # churns the cache but never grows it.
            del self._entries[next(iter(self._entries))]
        self._entries[key] = packet

    def clear(self) -> None:
        self._entries.clear()

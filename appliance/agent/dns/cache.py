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

K = TypeVar("K")


@dataclass(frozen=True)
class Cached:
    message: dns.message.Message
    stored: float  # monotonic seconds
    expires: float


class AnswerCache(Generic[K]):
    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._entries: OrderedDict[K, Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: K, message: dns.message.Message, now: float, ttl: int) -> None:
        if ttl <= 0:
            return
        self._entries[key] = Cached(message, now, now + min(ttl, MAX_TTL))
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class Packet:
    wire: bytes
    kind: str  # the stats counter a hit counts as
    generation: int
    until: float  # monotonic seconds


class PacketCache:
    def __init__(self, size: int = 4096) -> None:
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
        if len(self._entries) >= self._size:
            # Oldest first (dicts keep insertion order): a flood of distinct queries
            # churns the cache but never grows it.
            del self._entries[next(iter(self._entries))]
        self._entries[key] = packet

    def clear(self) -> None:
        self._entries.clear()

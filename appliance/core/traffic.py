"""Bytes per minute over the last day: a ring of SLOTS counters per direction.
Pure (the agent feeds it, agent/traffic.py).

Slot i holds minute m where m % SLOTS == i; `end` is the newest minute held
(unix minutes). Moving to a later minute zeroes the slots skipped, so a gap (the
agent was stopped, the Pi was off) reads as no traffic. An `array('Q')` is 8
bytes a slot: 23 KB for a peer's day, both directions.
"""

from __future__ import annotations

import base64
import zlib
from array import array
from typing import Any

STEP = 60  # seconds a slot covers
SLOTS = 24 * 60  # a day
_TYPECODE = "Q"


class Ring:
    def __init__(self, end: int) -> None:
        self.end = end  # the newest minute held (unix seconds // STEP)
        self.rx = array(_TYPECODE, bytes(8 * SLOTS))
        self.tx = array(_TYPECODE, bytes(8 * SLOTS))

    def advance(self, minute: int) -> None:
        """Make `minute` the newest; the minutes between read as zero."""
        if minute <= self.end:
            return
        skipped = min(minute - self.end, SLOTS)
        for m in range(minute - skipped + 1, minute + 1):
            self.rx[m % SLOTS] = self.tx[m % SLOTS] = 0
        self.end = minute

    def add(self, minute: int, rx: int, tx: int) -> None:
        """Count bytes in `minute`; a minute older than the ring holds is dropped."""
        self.advance(minute)
        if minute <= self.end - SLOTS:
            return
        self.rx[minute % SLOTS] += rx
        self.tx[minute % SLOTS] += tx

    def series(self, minutes: int, end: int) -> tuple[list[int], list[int]]:
        """The `minutes` up to and including `end`, oldest first."""
        self.advance(end)
        first = end - minutes + 1
        rx, tx = [], []
        for m in range(first, end + 1):
            held = self.end - SLOTS < m <= self.end
            rx.append(self.rx[m % SLOTS] if held else 0)
            tx.append(self.tx[m % SLOTS] if held else 0)
        return rx, tx

    def empty(self) -> bool:
        return not any(self.rx) and not any(self.tx)

    # -- a snapshot: zlib of the arrays, base64 (a quiet peer's day is ~50 bytes) ----

    def to_json(self) -> dict[str, Any]:
        return {"rx": _pack(self.rx), "tx": _pack(self.tx)}

    @classmethod
    def from_json(cls, end: int, doc: object) -> Ring:
        """ValueError when `doc` is not what to_json wrote."""
        if not isinstance(doc, dict):
            raise ValueError("must be an object with rx and tx")
        ring = cls(end)
        ring.rx, ring.tx = _unpack(doc.get("rx")), _unpack(doc.get("tx"))
        return ring


def _pack(values: array[int]) -> str:
    return base64.b64encode(zlib.compress(values.tobytes(), 6)).decode()


def _unpack(text: object) -> array[int]:
    if not isinstance(text, str):
        raise ValueError("rx and tx must be base64 text")
    try:
        # At most one byte more than a ring: a bad file cannot make it inflate without end.
        raw = zlib.decompressobj().decompress(base64.b64decode(text, validate=True), 8 * SLOTS + 1)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"not a packed ring: {e}") from None
    if len(raw) != 8 * SLOTS:
        raise ValueError(f"a packed ring holds {8 * SLOTS} bytes, not {len(raw)}")
    values = array(_TYPECODE)
    values.frombytes(raw)
    return values

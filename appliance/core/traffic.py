"""Bytes per minute over the last day: a ring of SLOTS counters per direction.
Pure (the agent feeds it, agent/traffic.py).

Slot i holds minute m where m % SLOTS == i; `end` is the newest minute held
(unix minutes). Moving to a later minute zeroes the slots skipped, so a gap (the
agent was stopped, the Pi was off) reads as no traffic. A direction is an
`array('I')`, 4 bytes a slot (11.5 KB for a peer's day, both directions: the agent
keeps one per peer, issue 14's footprint), until a minute holds 4 GiB or more;
then that direction becomes an `array('Q')`. Snapshots are always 8 bytes a slot.
"""

from __future__ import annotations

import base64
import zlib
from array import array
from typing import Any

STEP = 60  # seconds a slot covers
SLOTS = 24 * 60  # a day
_TYPECODE = "Q"  # snapshots, and a direction that outgrew _NARROW
_NARROW = "I"
_NARROW_MAX = 2**32 - 1


class Ring:
    def __init__(self, end: int) -> None:
        self.end = end  # the newest minute held (unix seconds // STEP)
        self.rx = array(_NARROW, bytes(4 * SLOTS))
        self.tx = array(_NARROW, bytes(4 * SLOTS))

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
        slot = minute % SLOTS
        self.rx = _widened(self.rx, self.rx[slot] + rx)
        self.tx = _widened(self.tx, self.tx[slot] + tx)
        self.rx[slot] += rx
        self.tx[slot] += tx

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


def _widened(values: array[int], value: int) -> array[int]:
    """`values`, as an array('Q') if `value` does not fit the narrow type."""
    if values.typecode == _NARROW and value > _NARROW_MAX:
        return array(_TYPECODE, values)
    return values


def _pack(values: array[int]) -> str:
    wide = values if values.typecode == _TYPECODE else array(_TYPECODE, values)
    return base64.b64encode(zlib.compress(wide.tobytes(), 6)).decode()


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
    return array(_NARROW, values) if max(values) <= _NARROW_MAX else values

"""Traffic history kept by the agent: bytes per minute over the last day, per
peer and in total (core/traffic.py's rings), for `/v1/traffic`, so a reload of
the dashboard, or a restart of the agent, still shows the last hours.

Fed from the loop's tick (every 2 s): the growth of each peer's kernel counters
since the previous tick. A counter that went down belongs to a peer the kernel
re-added (its counters start again at zero). A peer that has never completed a
handshake and sent nothing has carried no traffic: what the kernel counts for it
is our own handshake initiations (148 bytes every few seconds to an offline
peer), so it gets no ring (11.5 KB, issue 14's footprint) and does not look
active. At the agent's start the kernel's counters are taken as they are (the
bytes of the downtime are not known); a peer that appears later is new in the
kernel and all its bytes count.

Kept in memory; a snapshot (`traffic.json`, a few KB: zlib of the rings) is
written at most every SAVE_EVERY seconds and at a clean stop, atomically. A peer
neither in the netmap nor in the kernel has left: its ring is dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from appliance.base.files import atomic_write
from appliance.base.keys import PublicKey
from appliance.core.traffic import SLOTS, STEP, Ring
from appliance.kernel.base import PeerStats

log = logging.getLogger(__name__)

SAVE_EVERY = 600.0  # seconds between snapshots at most: an SD card sees ~150 writes a day
VERSION = 1


class Traffic:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.total = Ring(0)
        self.peers: dict[PublicKey, Ring] = {}
        self.active: dict[PublicKey, float] = {}  # when each peer's counters last grew
        self._last: dict[PublicKey, tuple[int, int]] = {}
        self._sampled = False
        self._dirty = False
        self._saved = time.monotonic()

    # -- feeding ----------------------------------------------------------------

    def sample(self, now: float, stats: Mapping[PublicKey, PeerStats], keep: Collection[PublicKey]) -> None:
        """The kernel's counters now; `keep`: the netmap's peers (a peer the kernel
        does not hold right now, yet still in the mesh, keeps its history)."""
        minute = int(now // STEP)
        rx_all = tx_all = 0
        with self._lock:
            for key, s in stats.items():
                before = self._last.get(key)
                self._last[key] = (s.rx_bytes, s.tx_bytes)
                if before is None:
                    if not self._sampled:
                        continue  # at start: the kernel's counters of before are not ours to count
                    before = (0, 0)
                rx = s.rx_bytes - before[0] if s.rx_bytes >= before[0] else s.rx_bytes
                tx = s.tx_bytes - before[1] if s.tx_bytes >= before[1] else s.tx_bytes
                if rx or (tx and s.last_handshake is not None):
                    self.peers.setdefault(key, Ring(minute)).add(minute, rx, tx)
                    self.active[key] = now
                    rx_all, tx_all = rx_all + rx, tx_all + tx
            self.total.add(minute, rx_all, tx_all)
            for key in [k for k in self.peers if k not in stats and k not in keep]:
                del self.peers[key]
            for key in [k for k in self._last if k not in stats]:
                del self._last[key]  # re-added later, its counters start at zero
            for key in [k for k in self.active if k not in stats and k not in keep]:
                del self.active[key]
            self._sampled = True
            self._dirty = self._dirty or bool(rx_all or tx_all)

    def last_active(self) -> dict[PublicKey, float]:
        with self._lock:
            return dict(self.active)

    # -- reading ----------------------------------------------------------------

    def series(self, minutes: int, now: float) -> dict[str, Any]:
        """`/v1/traffic`: `minutes` values per direction, oldest first; the last is
        the minute now running, which ends at `end`."""
        if not 1 <= minutes <= SLOTS:
            raise ValueError(f"minutes {minutes} is out of range (1-{SLOTS})")
        minute = int(now // STEP)
        with self._lock:
            rx, tx = self.total.series(minutes, minute)
            peers = {}
            for key, ring in self.peers.items():
                prx, ptx = ring.series(minutes, minute)
                peers[str(key)] = {"rx": prx, "tx": ptx}
        return {"step": STEP, "end": (minute + 1) * STEP, "total": {"rx": rx, "tx": tx}, "peers": peers}

    # -- the snapshot -------------------------------------------------------------

    def load(self) -> None:
        """The last snapshot, if there is a good one; a bad one is logged and ignored."""
        if self.path is None or not self.path.exists():
            return
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc, dict) or doc.get("version") != VERSION or doc.get("step") != STEP:
                raise ValueError("not a version 1 snapshot of 60 s steps")
            end = doc["end"]
            if isinstance(end, bool) or not isinstance(end, int):
                raise ValueError(f"end {end!r} is not a minute")
            total = Ring.from_json(end, doc.get("total"))
            raw_peers = doc.get("peers")
            if not isinstance(raw_peers, dict):
                raise ValueError("peers must be an object")
            peers = {PublicKey.from_base64(k): Ring.from_json(end, v) for k, v in raw_peers.items()}
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: %s; the traffic history starts empty", self.path, e)
            return
        with self._lock:
            self.total, self.peers = total, peers
        log.info("traffic history of %d peer(s) read from %s", len(peers), self.path)

    def flush(self, force: bool = False) -> None:
        """Write the snapshot if anything was counted since the last, and SAVE_EVERY
        has passed (or `force`: a clean stop)."""
        if self.path is None or not self._dirty:
            return
        if not force and time.monotonic() - self._saved < SAVE_EVERY:
            return
        with self._lock:
            for ring in self.peers.values():
                ring.advance(self.total.end)  # one `end` for all: slots are minutes modulo SLOTS
            doc = {
                "version": VERSION,
                "step": STEP,
                "end": self.total.end,
                "total": self.total.to_json(),
                "peers": {str(k): r.to_json() for k, r in self.peers.items() if not r.empty()},
            }
            self._dirty = False
        try:
            atomic_write(self.path, json.dumps(doc) + "\n", mode=0o600)
        except OSError as e:
            log.warning("could not save the traffic history to %s: %s", self.path, e)
        self._saved = time.monotonic()

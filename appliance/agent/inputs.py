"""What the loop plans from: the wanted inputs, patched in memory by each update.

`Wanted` is what the sources said last (a netmap, maybe none yet; prefs; hosted
devices); `Inputs` is a complete set the planner can use. Both are immutable:
an update makes a new value, O(change) for a netmap delta.

`Snapshot` writes the netmap to the state directory for the next start,
coalesced: an SD card sees at most one write a minute, not one per delta.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.agent.bus import (
    DevicesChanged,
    KeyRotated,
    NetmapDelta,
    NetmapFull,
    NetmapGone,
    PathsChosen,
    PrefsChanged,
    Update,
)
from appliance.base.files import atomic_write
from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint
from appliance.core.model import HostedDevice, Scope
from appliance.core.prefs import Prefs
from appliance.wire.mapdelta import MapDelta, apply_delta
from appliance.wire.netmap import Netmap, netmap_json

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 60.0  # seconds between netmap snapshots while deltas arrive


@dataclass(frozen=True)
class Inputs:
    netmap: Netmap
    prefs: Prefs
    devices: tuple[HostedDevice, ...] = ()  # phones this node hosts (devices/)
    paths: Mapping[PublicKey, Endpoint] = field(default_factory=dict)  # chosen endpoints (reach/)

    @property
    def scope(self) -> Scope:
        return Scope(self.prefs.interface, self.prefs.table, self.prefs.fwmark)


@dataclass(frozen=True)
class Wanted:
    netmap: Netmap | None
    prefs: Prefs
    devices: tuple[HostedDevice, ...] = ()
    paths: Mapping[PublicKey, Endpoint] = field(default_factory=dict)  # reach/: chosen endpoints

    def inputs(self) -> Inputs | None:
        return None if self.netmap is None else Inputs(self.netmap, self.prefs, self.devices, self.paths)

    def patched(self, update: Update) -> Wanted:
        """This value with one update applied. Raises ConfigError for a delta
        that does not fit the netmap (then the last good state stays)."""
        if isinstance(update, NetmapFull):
            return replace(self, netmap=update.netmap)
        if isinstance(update, NetmapDelta):
            if self.netmap is None:
                log.warning("a netmap delta came before any full map: ignored")
                return self
            return replace(self, netmap=apply_delta(self.netmap, update.delta, update.source))
        if isinstance(update, KeyRotated):
            if self.netmap is None:
                return self
            me = replace(self.netmap.self_node, public_key=update.public_key)
            return replace(self, netmap=apply_delta(self.netmap, MapDelta(self_node=me), "key rotation"))
        if isinstance(update, PrefsChanged):
            return replace(self, prefs=update.prefs)
        if isinstance(update, DevicesChanged):
            return replace(self, devices=update.devices)
        if isinstance(update, PathsChosen):
            return replace(self, paths=dict(update.endpoints))
        if isinstance(update, NetmapGone):
            return replace(self, netmap=None)
        return self


class Snapshot:
    """The netmap on disk for the next start: written at most every `every`
    seconds (and at a clean stop), atomically; never read back at run time."""

    def __init__(self, path: Path, every: float = SNAPSHOT_EVERY) -> None:
        self.path, self.every = path, every
        self._pending: Netmap | None = None
        self._written: Netmap | None = None
        self._last = float("-inf")

    def mark(self, netmap: Netmap | None) -> None:
        if netmap is None:
            self._pending = self._written = None
            self.path.unlink(missing_ok=True)
        elif netmap is not self._written:
            self._pending = netmap

    @property
    def due(self) -> float:
        """When the next write is due (time.monotonic), inf when nothing waits."""
        return float("inf") if self._pending is None else self._last + self.every

    def flush(self, force: bool = False) -> None:
        if self._pending is None or (not force and time.monotonic() < self.due):
            return
        netmap, self._pending = self._pending, None
        atomic_write(self.path, json.dumps(netmap_json(netmap)) + "\n")
        self._written, self._last = netmap, time.monotonic()
        log.debug("netmap snapshot written to %s", self.path)

"""Static mode's source: a netmap file and a prefs file that someone else writes
(`meshpi agent --netmap F --prefs F`, the lab's data-plane tests).

A thread waits on inotify (watch.py, no polling); when a file changes it is
read and parsed here, once, and the typed result goes to the loop on the bus.
A file that does not parse becomes a `BadInput`: the last good state stays.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from appliance.agent.bus import BadInput, Bus, NetmapFull, PrefsChanged
from appliance.agent.watch import Watcher
from appliance.core.prefs import load_prefs
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import load_netmap

log = logging.getLogger(__name__)


class StaticFiles(threading.Thread):
    def __init__(self, netmap_path: Path, prefs_path: Path, bus: Bus) -> None:
        super().__init__(name="meshpi-static-files", daemon=True)
        self.netmap_path, self.prefs_path, self.bus = netmap_path, prefs_path, bus
        self._watcher = Watcher([netmap_path, prefs_path])
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        self._watcher.wake()

    def reload(self) -> None:
        """Read both files again (SIGHUP) and hand them over."""
        self.read({self.netmap_path, self.prefs_path})

    def read(self, changed: set[Path]) -> None:
        if changed:
            log.info("%s changed", ", ".join(sorted(p.name for p in changed)))
        try:
            if self.prefs_path in changed:
                self.bus.put(PrefsChanged(load_prefs(self.prefs_path)))
            if self.netmap_path in changed:
                self.bus.put(NetmapFull(load_netmap(self.netmap_path)))
        except ConfigError as e:
            self.bus.put(BadInput(str(e)))

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                changed = self._watcher.wait(3600.0)
                if changed and not self._stopping.is_set():
                    self.read(changed)
        finally:
            self._watcher.close()

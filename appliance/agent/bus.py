"""The agent's one path in memory: sources hand typed updates to the reconcile loop.

    control link ──NetmapFull/NetmapDelta/KeyRotated──┐
    LocalAPI ──────PrefsChanged/DevicesChanged────────┼──▶ Bus ──▶ loop: patch the wanted
    static files ──NetmapFull/PrefsChanged/BadInput───┤            inputs, plan, apply
    signals ───────Stop/Reload────────────────────────┤              │
    rtnetlink ─────HostChanged────────────────────────┘              │
                                                                     ▼ Applied
                                                      subscribers (reachability, DNS, …)

Updates travel as objects, never through files: a delta for one peer is parsed
once (O(change)) by the link and patched into the typed netmap by the loop.
Files in the state directory are snapshots written for the next start.

`put` may be called from any thread and from a signal handler (SimpleQueue's put
is reentrant). `take` blocks for the first update and then drains whatever else
is queued, so a burst of changes is planned and applied once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint
from appliance.core.model import HostedDevice
from appliance.core.prefs import Prefs
from appliance.wire.mapdelta import MapDelta
from appliance.wire.netmap import Netmap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetmapFull:
    netmap: Netmap


@dataclass(frozen=True)
class NetmapDelta:
    delta: MapDelta
    source: str = "control (delta)"


@dataclass(frozen=True)
class KeyRotated:
    """This node now has another node key (control accepted it)."""

    public_key: PublicKey


@dataclass(frozen=True)
class PathsChosen:
    """The endpoint to use for some peers instead of the netmap's first candidate
    (a candidate that completed a handshake, or the relay's local proxy): the
    whole set each time; a peer left out goes back to the netmap's endpoint."""

    endpoints: Mapping[PublicKey, Endpoint]


@dataclass(frozen=True)
class PrefsChanged:
    prefs: Prefs


@dataclass(frozen=True)
class DevicesChanged:
    devices: tuple[HostedDevice, ...]


@dataclass(frozen=True)
class NetmapGone:
    """Logged out: the netmap no longer holds, nothing is to be applied."""


@dataclass(frozen=True)
class BadInput:
    """A source could not read its input (a static file): the last good state stays."""

    message: str


@dataclass(frozen=True)
class Reload:
    """SIGHUP, or a resync: read the kernel (and the static files) afresh."""

    why: str


@dataclass(frozen=True)
class HostChanged:
    """The host's own networks changed (netwatch.py: an address, a route, a link
    up or down, not meshpi's): re-plan from fresh host facts. Unlike `Reload`
    nothing is re-read from files or from meshpi's kernel objects, which did not
    change; `since` is the monotonic time of the first event of the burst."""

    summary: str
    since: float


@dataclass(frozen=True)
class Stop:
    why: str


Update = (
    NetmapFull
    | NetmapDelta
    | PathsChosen
    | KeyRotated
    | PrefsChanged
    | DevicesChanged
    | NetmapGone
    | BadInput
    | Reload
    | HostChanged
    | Stop
)


@dataclass(frozen=True)
class Applied:
    """Told to subscribers after each apply: what the kernel now holds, from which inputs."""

    netmap: Netmap | None
    prefs: Prefs
    changes: int


class Bus:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Update] = queue.SimpleQueue()
        self._subscribers: list[Callable[[Applied], None]] = []
        self._last: Applied | None = None
        self._lock = threading.Lock()

    def put(self, update: Update) -> None:
        self._queue.put(update)

    def take(self, timeout: float) -> list[Update]:
        """The updates that arrived: waits up to `timeout` for the first one."""
        try:
            first = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return []
        updates = [first]
        while True:
            try:
                updates.append(self._queue.get_nowait())
            except queue.Empty:
                return updates

    def subscribe(self, callback: Callable[[Applied], None]) -> None:
        """`callback` runs on the loop's thread after each apply: keep it quick. A
        subscriber that comes after an apply is told the last one at once (the
        agent applies the saved netmap before it starts its services)."""
        with self._lock:
            self._subscribers.append(callback)
            last = self._last
        if last is not None:
            self._tell(callback, last)

    def publish(self, event: Applied) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            self._last = event
        for callback in subscribers:
            self._tell(callback, event)

    @staticmethod
    def _tell(callback: Callable[[Applied], None], event: Applied) -> None:
        try:
            callback(event)
        except Exception:  # a subscriber's bug must not stop the data plane
            log.exception("a subscriber of the agent's updates failed")

"""Control on this very node (a Pi that created its own mesh): its ports mapped on
the home router too, so that nodes away from home log in at the public address.

Control serves its node API and the relay on one TCP port (8080), and STUN on UDP
3478; both are mapped through the same PortMapper as the WireGuard port (PCP,
NAT-PMP, UPnP-IGD), for as long as control's state is on this node. The login URL
other nodes get (localapi `local_control.login_url`, `/v1/mesh/create`) is then
http://<WAN address>:<mapped port>.

When no mapping is possible (no protocol answers, or a carrier's NAT in front of
the router makes the mapped address worthless), `verdict` says that control must
run on a reachable host, and how.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.agent.reach.phones import cgnat_reason
from appliance.agent.reach.portmap import PortMapper, PortMapState
from appliance.agent.reach.stun import Discovery
from appliance.base.net import Endpoint

log = logging.getLogger(__name__)

STUN_PORT = 3478
CHECK = 10.0  # seconds between looks at the router: a new WAN address gives a new login URL soon
ELSEWHERE = (
    "run control on a host the internet reaches (a VPS): `meshpi-control serve` there, "
    "then `meshpi up --login-server <the URL it prints>` on every node, this Pi included"
)

# (port, transport) -> a started mapper
Mappers = Callable[[int, str], PortMapper]


def _start(port: int, transport: str) -> PortMapper:
    return PortMapper(port, transport=transport, probe_interval=CHECK).start()


@dataclass(frozen=True)
class ControlReach:
    local: bool  # control runs on this node
    url: str | None  # http://<public>:<port>: what nodes away from home log in at
    reachable: bool
    why: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"local": self.local, "url": self.url, "reachable": self.reachable, "why": self.why,
                "fix": self.fix}  # fmt: skip


class ControlMapper:
    def __init__(self, make: Mappers = _start) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._local: int | None = None  # control's TCP port while it runs here
        self._port: int | None = None  # the same while it is mapped (port mapping on)
        self._mappers: list[PortMapper] = []

    def follow(self, port: int | None, enabled: bool) -> None:
        """Map control's TCP `port` (and STUN) while it runs here (`port` not None)
        and port mapping is on; stop mapping when either goes."""
        wanted = port if enabled else None
        with self._lock:
            self._local = port
            if wanted == self._port:
                return
            self._close()
            if wanted is not None:
                log.info("control runs on this node: mapping its TCP port %d and STUN (UDP %d)",
                         wanted, STUN_PORT)  # fmt: skip
                self._mappers = [self._make(wanted, "tcp"), self._make(STUN_PORT, "udp")]
            self._port = wanted

    def state(self) -> PortMapState | None:
        """The TCP mapping's state (None while control is not mapped)."""
        with self._lock:
            return self._mappers[0].state if self._mappers else None

    def public(self, stun: Discovery | None) -> Endpoint | None:
        """The public address:port of control's TCP port, when the internet reaches it."""
        state = self.state()
        if state is None or state.external is None or cgnat_reason(state, stun) is not None:
            return None
        return state.external

    def verdict(self, stun: Discovery | None) -> ControlReach:
        with self._lock:
            local, port = self._local, self._port
        state = self.state()
        if local is None:
            return ControlReach(False, None, False, "control does not run on this node")
        if port is None or state is None:
            why = "nodes away from home cannot reach control here: port mapping is off (prefs port_mapping)"
            fix = (f"turn port_mapping on, or forward TCP {local} and UDP {STUN_PORT} on the router to this "
                   f"Pi and create the mesh with --public-url; or {ELSEWHERE}")  # fmt: skip
            return ControlReach(True, None, False, why, fix)
        cgnat = cgnat_reason(state, stun)
        if cgnat is not None:
            return ControlReach(True, None, False, f"nodes away from home cannot reach control here: {cgnat}",
                                ELSEWHERE)  # fmt: skip
        if state.external is None:
            error = state.last_error or "still asking the home router"
            why = f"nodes away from home cannot reach control here: no mapping of TCP {port} ({error})"
            fix = f"turn on UPnP-IGD or NAT-PMP/PCP on the router, or {ELSEWHERE}"
            return ControlReach(True, None, False, why, fix)
        url = f"http://{state.external}"
        return ControlReach(True, url, True, f"the home router forwards {state.external} to control here")

    def close(self) -> None:
        with self._lock:
            self._close()
            self._port = self._local = None

    def _close(self) -> None:
        for mapper in self._mappers:
            mapper.close()
        self._mappers = []

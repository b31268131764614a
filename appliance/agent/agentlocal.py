"""What the agent offers the LocalAPI, besides its loop (loop.py): reads of the
kernel under the agent's lock, the control link's status, the LEDs' tick, and
`logout` (the data plane goes, the agent stays and waits for a new login).

A mixin of `Agent`: it uses the agent's state (inputs, system, reconciler). The
LocalAPI's handlers do not see it whole: each declares the narrow read-only view
it needs as a Protocol (localapi/status.py, localapi/routes.py, devices/hosted.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.agent import bus as updates
from appliance.agent import commands
from appliance.agent.devices.hosted import load_devices
from appliance.agent.leds import AgentLeds
from appliance.agent.localapi.connected import HostedRow, exit_sources
from appliance.agent.logring import LogRing
from appliance.agent.reconcile import Reconciler
from appliance.agent.statedir import StateDir
from appliance.agent.traffic import Traffic
from appliance.base.keys import PublicKey
from appliance.base.net import IPAddress
from appliance.core.changes import Change
from appliance.core.model import Connected, HostedDevice, State
from appliance.core.prefs import Prefs
from appliance.kernel import conntrack
from appliance.kernel.base import KernelError, WgDevice
from appliance.kernel.system import ApplyError, System
from appliance.kernel.upgrades import UpgradePaths
from appliance.kernel.upgrades import read_status as read_upgrades
from appliance.leds.states import LedFacts
from appliance.wire.fields import ConfigError

if TYPE_CHECKING:
    from appliance.agent.control.link import ControlLink
    from appliance.agent.dns.host import HostDnsLink
    from appliance.agent.dns.service import DnsService
    from appliance.agent.inputs import Inputs, Snapshot, Wanted
    from appliance.agent.reach.paths import PathChooser
    from appliance.agent.reach.phones import PhoneReach
    from appliance.agent.reach.service import Reachability
    from appliance.core.conflicts import RouteConflict

log = logging.getLogger(__name__)

LOGOUT_WAIT = 5.0  # seconds for the control link to notice a logout
LINK_GAVE_UP = ("error", "needs-login", "unreachable")
EXIT_USERS_EVERY = 5.0  # seconds: a conntrack dump per dashboard poll would be too many


class AgentLocal:
    # Set by Agent.__init__ (loop.py).
    netmap_path: Path
    prefs_path: Path
    state: StateDir
    control: bool
    make_system: Callable[[str], System]
    system: System | None
    reconciler: Reconciler | None
    inputs: Inputs | None
    wanted: Wanted
    chosen_prefs: Prefs | None
    bus: updates.Bus
    snapshot: Snapshot | None
    conflicts: tuple[RouteConflict, ...]
    reach: Reachability | None
    paths: PathChooser | None
    host_dns: HostDnsLink
    dns: DnsService | None

    def _init_local(self, leds: AgentLeds) -> None:
        # The reconcile loop and the LocalAPI's threads take turns on the kernel.
        self.lock = threading.RLock()
        self.leds = leds
        self.logs = LogRing()
        self.link: ControlLink | None = None
        self.last_error: str | None = None  # the last apply or input failure, until one succeeds
        self.changes_applied = 0
        self._reader: System | None = None
        self._exit_users: tuple[float, frozenset[IPAddress]] | None = None
        self.traffic = Traffic(self.state.traffic_file)
        self.traffic.load()

    def _sync(self, reconciler: Reconciler, desired: State, reread: bool = False) -> list[Change]:
        try:
            applied = reconciler.sync(desired, reread=reread)
        except ApplyError as e:
            self.changes_applied += len(e.applied)
            raise
        self.changes_applied += len(applied)
        return applied

    # -- reads -------------------------------------------------------------------

    def control_status(self) -> dict[str, Any]:
        if not self.control:
            return {"state": "static", "detail": f"netmap from {self.netmap_path}"}
        if self.link is None:
            return {"state": "connecting", "detail": "the control link is starting"}
        return self.link.status.to_json()

    def stored_prefs(self) -> Prefs:
        """The prefs the owner chose last (what PATCH /v1/prefs changes), even
        before the loop has taken them."""
        chosen = self.chosen_prefs
        return chosen if chosen is not None else self.wanted.prefs

    def upgrades_report(self) -> dict[str, Any]:
        """Debian's security updates: read from apt's and its hooks' files, never written here."""
        paths = UpgradePaths(log=self.state.upgrades_file)
        return read_upgrades(self.stored_prefs(), paths)

    def applied(self) -> Inputs | None:
        """The inputs the kernel holds now (None before the first apply)."""
        return self.inputs

    @property
    def devices_file(self) -> Path:
        return self.state.devices_file

    def devices_changed(self, devices: tuple[HostedDevice, ...]) -> None:
        self.bus.put(updates.DevicesChanged(devices))

    def netcheck(self) -> dict[str, Any] | None:
        if self.reach is None:
            return None
        report = self.reach.netcheck()
        latency = self.paths.relay_latency() if self.paths is not None else None
        report["relay_ms"] = None if latency is None else round(latency * 1000, 1)
        report["checks"] = self.paths.check_counters() if self.paths is not None else None
        return report

    def phones_reach(self) -> PhoneReach:
        """What a hosted phone's config dials (reach/phones.py), with the owner's newest prefs."""
        from appliance.agent.reach.phones import phones

        prefs = self.stored_prefs()
        return self.reach.phones(prefs) if self.reach is not None else phones(prefs, None, None)

    def reach_status(self) -> dict[str, Any] | None:
        """Port mapping, STUN, the endpoints told to control and the peers' connectivity
        checks' counts (None in static mode)."""
        if self.reach is None:
            return None
        status = self.reach.status()
        status["checks"] = self.paths.check_counters() if self.paths is not None else None
        return status

    def route_conflicts(self) -> list[str]:
        """Peers' routes this host's own networks win over (set aside, or narrowed)."""
        return [str(c) for c in self.conflicts]

    def hosted_rows(self) -> list[HostedRow]:
        """Every device this node hosts, enabled or not (devices.json)."""
        try:
            return [d.row() for d in load_devices(self.state.devices_file)]
        except ConfigError as e:
            log.warning("%s", e)
            return []

    def traffic_active(self) -> dict[PublicKey, float]:
        return self.traffic.last_active()

    def exit_users(self) -> frozenset[IPAddress]:
        """Mesh addresses seen going to the internet through this node (conntrack),
        read at most every EXIT_USERS_EVERY seconds; none unless it offers an exit."""
        inputs = self.inputs
        if inputs is None or not inputs.prefs.advertise_exit_node:
            return frozenset()
        cached = self._exit_users
        if cached is not None and time.monotonic() - cached[0] < EXIT_USERS_EVERY:
            return cached[1]
        mesh = inputs.netmap.mesh
        users = exit_sources(conntrack.flows(), (mesh.ipv4, mesh.ipv6))
        self._exit_users = (time.monotonic(), users)
        return users

    def reach_report(self) -> dict[str, Any] | None:
        """netcheck's verdict on what reachability knows now, without a new probe."""
        return self.reach.report() if self.reach is not None else None

    def led_state(self) -> str:
        return self.leds.state.value

    def firstboot_report(self) -> dict[str, Any] | None:
        path = self.state.firstboot_file
        return commands.read_json(path) if path.exists() else None

    def read_device(self) -> WgDevice | None:
        with self.lock:
            if self.system is None or self.inputs is None:
                return None
            return self.system.wireguard.read(self.inputs.scope.interface)

    def _links_system(self) -> System:
        if self.system is not None:
            return self.system
        if self._reader is None:
            self._reader = self.make_system(self.stored_prefs().backend)
        return self._reader

    def connected(self) -> tuple[Connected, ...]:
        """Prefixes on this host's other interfaces (uplink, LAN)."""
        with self.lock:
            try:
                return self._links_system().links.connected(exclude=self.stored_prefs().interface)
            except KernelError as e:
                log.warning("cannot read the host's interfaces: %s", e)
                return ()

    def lan_address(self, dev: str, prefixes: list[str]) -> str | None:
        with self.lock:
            try:
                found = self._links_system().links.addresses(dev)
            except KernelError:
                return None
        for address in sorted(found, key=lambda a: (a.version, int(a.ip))):
            if isinstance(address, IPv4Interface | IPv6Interface) and str(address.network) in prefixes:
                return str(address.ip)
        return None

    # -- the LEDs ------------------------------------------------------------------

    def tick(self) -> None:
        """Show on the LEDs what the agent knows now (the loop calls this every
        couple of seconds and after every update; logout too, from its thread)."""
        with self.lock:
            self._tick()

    def _tick(self) -> None:
        prefs = self.inputs.prefs if self.inputs is not None else self.wanted.prefs
        self.leds.configure(prefs.led_pins, prefs.act_led)
        offers_exit = prefs.advertise_exit_node
        total = None
        try:
            device = self.read_device()
        except KernelError:
            device = None
        if device is not None and self.inputs is not None:
            keep = self.inputs.netmap.index.peers if self.inputs.netmap.index is not None else ()
            self.traffic.sample(time.time(), device.stats, keep)
        if offers_exit and device is not None:
            total = sum(s.rx_bytes + s.tx_bytes for s in device.stats.values())
        state = self.control_status().get("state")
        self.leds.show(LedFacts(
            started=self.inputs is not None,
            online=not self.control or state in ("connected", "connecting"),
            offers_exit=offers_exit,
            tunnel_bytes=self.leds.tunnel_growth(total),
            last_error=self.last_error,
        ))  # fmt: skip

    # -- leaving the mesh ----------------------------------------------------------

    def logout(self) -> str:
        """Tell control, take the data plane down, and wait for a new login."""
        before = self.link.status.seq if self.link is not None else 0
        detail = commands.logout(self.state)  # raises ControlError: then nothing changed
        if self.link is not None:
            self.link.login_changed()
            # Until the link hears it is out, a map answer may still be on its way.
            self.link.wait_for(before, LINK_GAVE_UP, LOGOUT_WAIT)
        if self.reach is not None:
            self.reach.release()
        with self.lock:
            self.take_down()
            self.host_dns.restore()
            if self.dns is not None:
                self.dns.close()  # its addresses are gone; the next login's apply starts it again
            self.wanted = self.wanted.patched(updates.NetmapGone())
            if self.snapshot is not None:
                self.snapshot.mark(None)
        self.tick()
        return detail

    def take_down(self) -> None:
        """Remove everything meshpi set up; the agent runs on with nothing applied."""
        owned = self.state.owned()
        reconciler = self.reconciler
        if reconciler is None and owned is not None:
            reconciler = Reconciler(self.system or self.make_system(owned.backend), owned.scope)
        if reconciler is not None:
            self._sync(reconciler, State(), reread=True)
            log.info("logged out: %s, its rules, routes and table are gone", reconciler.scope.interface)
        self.state.forget_owned()
        self.inputs, self.reconciler = None, None

"""The agent's main loop: reconcile the kernel toward the wanted inputs, again
whenever an update arrives on the bus (bus.py), and every `resync` seconds
from a fresh read of the kernel.

Two sources of netmap, one loop:
- control mode (`meshpi agent`): the ControlLink thread long-polls control and
  hands each full map or delta to the bus, parsed once; prefs and devices come
  from the LocalAPI the same way;
- static mode: a netmap file someone else writes (`meshpi agent --netmap F
  --prefs F`), read by the StaticFiles thread (static.py).

Bad input never reaches the kernel: at start it ends the agent with the error
(exit 2); later it is logged and the last good state stays in place.

The loop also ticks the status LEDs every LED_TICK seconds, and the LocalAPI
(localapi/) serves from threads of its own: kernel reads and applies from
either side hold `Agent.lock` (agentlocal.py). Subsystems that need run-time
state subscribe to the bus (`Applied`, after each apply). What the kernel
should hold is planned in planning.py; this module decides when to apply it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from appliance.agent import bus as updates
from appliance.agent.agentlocal import AgentLocal
from appliance.agent.commands import set_prefs
from appliance.agent.control.link import ControlLink, offers
from appliance.agent.dns.host import HostDnsLink
from appliance.agent.handshakes import carry_endpoints, start_handshakes, with_paths
from appliance.agent.inputs import Inputs, Snapshot, Wanted
from appliance.agent.leds import AgentLeds, LedOpener
from appliance.agent.netwatch import NetWatch
from appliance.agent.planning import AgentPlanning
from appliance.agent.reconcile import Reconciler
from appliance.agent.statedir import Owned, StateDir
from appliance.agent.static import StaticFiles
from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint
from appliance.core.conflicts import RouteConflict
from appliance.core.model import HostFacts, Scope, State
from appliance.core.planner import PeerMemo
from appliance.core.prefs import Prefs
from appliance.kernel import heap
from appliance.kernel.base import KernelError
from appliance.kernel.system import System
from appliance.wire.fields import ConfigError

if TYPE_CHECKING:
    from appliance.agent.dns.service import DnsService
    from appliance.agent.reach.paths import PathChooser
    from appliance.agent.reach.service import Reachability

log = logging.getLogger(__name__)

SystemFactory = Callable[[str], System]  # backend preference -> System
LED_TICK = 2.0  # seconds between looks at control and the tunnel's byte counters


class Service(Protocol):
    """Something the agent runs beside its loop (the LocalAPI), closed at exit."""

    def close(self) -> None: ...


class Agent(AgentPlanning, AgentLocal):
    def __init__(
        self,
        netmap_path: Path,
        prefs_path: Path,
        state: StateDir,
        make_system: SystemFactory,
        control: bool = False,
        leds: LedOpener | None = None,
        resolv_conf: Path | None = None,
    ) -> None:
        self.netmap_path, self.prefs_path = netmap_path, prefs_path
        # The host's DNS follows the mesh; resolv_conf: the file managed (None: /etc/resolv.conf).
        self.host_dns = HostDnsLink(state.hostdns_file, resolv_conf)
        self.state, self.make_system, self.control = state, make_system, control
        self.key = state.node_key()
        self.bus = updates.Bus()
        self.system: System | None = None
        self.reconciler: Reconciler | None = None
        self.wanted = Wanted(None, Prefs())
        self.chosen_prefs: Prefs | None = None  # set by the LocalAPI until the loop has taken it
        self.inputs: Inputs | None = None  # what was last applied
        self.exit_problem: str | None = None  # why the chosen exit node carries nothing
        self.conflicts: tuple[RouteConflict, ...] = ()  # peers' routes that collide with this host's networks
        self.snapshot = Snapshot(state.netmap_file) if control else None
        self.memo = PeerMemo()
        self._facts: tuple[Scope, HostFacts] | None = None
        self.facts_stale = True  # re-read the host's networks before the next plan
        self.applied_once = threading.Condition()  # notified after every apply (wait_applied)
        self.reach: Reachability | None = None  # port mapping and STUN, in control mode
        self.paths: PathChooser | None = None  # hole punching and the relay, in control mode
        self.dns: DnsService | None = None  # the node's resolver (agent/dns), once names come
        self._init_local(AgentLeds(leds))

    @classmethod
    def for_control(
        cls, state: StateDir, make_system: SystemFactory, leds: LedOpener | None = None,
        resolv_conf: Path | None = None,
    ) -> Agent:  # fmt: skip
        return cls(state.netmap_file, state.prefs_file, state, make_system, True, leds, resolv_conf)

    def start(self, inputs: Inputs) -> None:
        """Check and apply once. Raises ConfigError before any kernel change."""
        self.system = self.system or self.make_system(inputs.prefs.backend)
        desired = self.desired(inputs, self.system)
        previous = self.state.owned()
        if previous is not None and previous.scope != inputs.scope:
            log.info(
                "prefs moved meshpi from %s to %s: removing the old",
                previous.scope.interface, inputs.scope.interface,
            )  # fmt: skip
            self._sync(Reconciler(self.system, previous.scope), State())
        self.state.record_owned(Owned(inputs.scope, self.system.wireguard.name))
        self.reconciler = Reconciler(self.system, inputs.scope)
        applied = self._sync(self.reconciler, desired, reread=True)
        if applied:
            log.info("applied %d change(s); %s is up", len(applied), inputs.scope.interface)
        else:
            log.info("took over %s: the kernel already matches, no changes", inputs.scope.interface)
        self.inputs = inputs
        self._applied(len(applied))

    def update(self, reread: bool) -> None:
        """The wanted inputs changed or a resync is due: re-plan, apply what differs."""
        if reread:
            # A resync plans everything afresh: the memo's shortcuts never outlive it.
            self.facts_stale, self.memo = True, PeerMemo()
        inputs = self.wanted.inputs()
        if inputs is None:
            return
        if self.inputs is None:
            self.start(inputs)
            return
        assert self.system is not None and self.reconciler is not None
        desired = self.desired(inputs, self.system)  # a ConfigError leaves everything as it was
        if inputs.scope != self.inputs.scope:
            self._sync(Reconciler(self.system, self.inputs.scope), State())
            self.state.record_owned(Owned(inputs.scope, self.system.wireguard.name))
            self.reconciler = Reconciler(self.system, inputs.scope)
        before, self.inputs = self.inputs, inputs
        desired = carry_endpoints(self.system, before, inputs, desired)
        desired = with_paths(before.paths, inputs.paths, desired)
        self.memo.state = desired  # the next plan is derived from what the kernel will hold
        applied = self._sync(self.reconciler, desired, reread=reread)
        if applied:
            log.info("applied %d change(s)", len(applied))
            start_handshakes(self.system, before, inputs)
        self._applied(len(applied))

    def _applied(self, changes: int) -> None:
        assert self.inputs is not None
        with self.applied_once:
            self.applied_once.notify_all()
        if self.snapshot is not None:
            self.snapshot.mark(self.inputs.netmap)
        self.bus.publish(updates.Applied(self.inputs.netmap, self.inputs.prefs, changes))

    def receive(self, batch: list[updates.Update]) -> bool:
        """Patch the wanted inputs with a batch of updates; True if any changed them."""
        changed = False
        for update in batch:
            if isinstance(update, updates.BadInput):
                log.error("%s; keeping the last good state", update.message)
                self.last_error = update.message
                continue
            is_map = isinstance(update, updates.NetmapFull | updates.NetmapDelta)
            if self.control and is_map and not self.state.login_file.exists():
                continue  # a map that arrives after a logout must not bring the data plane back
            before = self.wanted
            try:
                self.wanted = self.wanted.patched(update)
            except ConfigError as e:
                log.error("%s; keeping the last good state", e)
                self.last_error = str(e)
                continue
            if self.link is not None and offers(before.prefs) != offers(self.wanted.prefs):
                self.link.offers_changed(self.wanted.prefs)  # tell control now, not after the long-poll
            if isinstance(update, updates.PrefsChanged) and self.chosen_prefs is update.prefs:
                self.chosen_prefs = None  # the loop has caught up with the owner's last choice
            changed = changed or self.wanted != before
        return changed

    def refresh(self, reread: bool) -> None:
        """update() under the kernel lock; a failure is logged, shown on the
        LEDs, and tried again at the next change or resync."""
        with self.lock:
            self.last_error = None
            try:
                self.update(reread)
            except ConfigError as e:
                log.error("%s; keeping the last good state", e)
                self.last_error = str(e)
            except KernelError as e:
                log.error("%s; will retry at the next resync", e)
                self.last_error = str(e)

    def set_prefs(self, changes: dict[str, Any]) -> Prefs:
        """The owner's change (LocalAPI): checked, stored for the next start, and
        handed to the loop. Raises ConfigError naming the field, changing nothing."""
        prefs = set_prefs(self.prefs_path, changes)
        self.chosen_prefs = prefs  # a GET right after this answers with it, not the loop's older copy
        self.bus.put(updates.PrefsChanged(prefs))
        return prefs

    def run(self, resync: float = 30.0, serve: Callable[[Agent], Service] | None = None,
            claim: Callable[[], None] | None = None) -> int:  # fmt: skip
        """Serve until SIGTERM/SIGINT. `claim` makes sure the LocalAPI's socket is
        no other agent's, before anything is applied; `serve` starts the LocalAPI
        once the saved netmap is applied and the services run."""
        self.state.lock()
        self.wanted = self.load()  # a ConfigError here ends the agent (exit 2)
        if claim is not None:
            claim()
        old_handlers = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        logging.getLogger().addHandler(self.logs)
        # Static mode: the files are watched from here on (no edit during the first apply is missed).
        source = None if self.control else StaticFiles(self.netmap_path, self.prefs_path, self.bus)
        server = None
        netwatch: NetWatch | None = None
        try:
            # The host's links, addresses and routes too: the socket queues what
            # changes after the first apply read them, until the thread starts.
            netwatch = NetWatch(self.bus, lambda: (self.wanted.prefs.interface, self.wanted.prefs.table))
            # The saved netmap first: peers, routes and nft are in place before the
            # services below are imported and started (issue 14: boot to exit node
            # ready). Each of them is told this apply when it subscribes.
            with self.lock:
                if self.wanted.inputs() is not None:
                    self.update(reread=True)
                else:
                    log.info("no netmap yet: waiting for control")
            self._start_services()
            server = serve(self) if serve is not None else None
            self.tick()
            for thread in (self.link, source, netwatch):
                if thread is not None:
                    thread.start()
            return self._loop(source, resync)
        finally:
            if server is not None:
                server.close()
            if self.link is not None:
                self.link.stop()
            if netwatch is not None:
                netwatch.stop()
            if self.reach is not None:
                self.reach.close()
            if self.paths is not None:
                self.paths.close()
            if self.dns is not None:
                self.dns.close()
            if source is not None:
                source.stop()
            if self.snapshot is not None:
                self.snapshot.flush(force=True)
            self.traffic.flush(force=True)
            self.host_dns.restore()  # its resolver stops with the agent
            self.leds.close()
            logging.getLogger().removeHandler(self.logs)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _start_services(self) -> None:
        """The resolver, and in control mode reachability, paths and the control
        link (started with the loop)."""
        from appliance.agent.dns.service import DnsService, host_resolvers

        # The resolver first, then the host pointed at it; names it does not know go to
        # the host's resolvers as they were before meshpi (host_dns keeps the original).
        self.dns = DnsService(host_resolvers(self.host_dns.original_servers))
        self.bus.subscribe(self.dns.on_applied)
        self.bus.subscribe(self.host_dns.on_applied)
        if not self.control:
            return
        from appliance.agent.reach.paths import PathChooser, relay_from_login
        from appliance.agent.reach.service import Reachability

        self.reach = Reachability(self._stun_servers, self._endpoints_changed)
        self.reach.on_moved = lambda: self.link.network_changed() if self.link is not None else None
        self.bus.subscribe(self.reach.on_applied)
        self.paths = PathChooser(self, self.bus.put, relay_from_login(self.state))
        self.link = ControlLink(
            self.state, lambda: self.wanted.prefs, lambda p: offers(p, self.reach_candidates()), self.bus
        )

    def wait_applied(self, timeout: float) -> bool:
        """Until a netmap is applied (after `up`: the data plane is there when it
        answers); False after `timeout` seconds."""
        with self.applied_once:
            return self.applied_once.wait_for(lambda: self.inputs is not None, timeout)

    def dns_status(self) -> dict[str, Any] | None:
        return self.dns.status() if self.dns is not None else None

    def dataplane_status(self) -> dict[str, Any]:
        from appliance.agent.localapi.dataplane import dataplane_status

        return dataplane_status(self._facts[1] if self._facts is not None else None, self.memo.state)

    def path_status(self) -> dict[PublicKey, str] | None:
        """Per peer, its path; None in static mode (no chooser: WireGuard's endpoint is the path)."""
        return self.paths.status() if self.paths is not None else None

    def reach_candidates(self) -> tuple[Endpoint, ...] | None:
        return self.reach.candidates() if self.reach is not None else None

    def _stun_servers(self) -> list[Endpoint]:
        from appliance.agent.reach.service import stun_servers

        return stun_servers(self.state.login_file, self.wanted.prefs.stun_servers)

    def _endpoints_changed(self) -> None:
        if self.link is not None:
            self.link.offers_changed(self.wanted.prefs)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.bus.put(updates.Reload(name) if signum == signal.SIGHUP else updates.Stop(name))

    def _loop(self, source: StaticFiles | None, resync: float) -> int:
        next_resync = time.monotonic() + resync
        next_tick = next_trim = time.monotonic()
        while True:
            wake = min(next_resync, next_tick, self.snapshot.due if self.snapshot else float("inf"))
            batch = self.bus.take(wake - time.monotonic())
            stop = next((u for u in batch if isinstance(u, updates.Stop)), None)
            if stop is not None:
                # The interface and the table stay up: a restarted agent takes them over.
                log.info("stopping on %s; the data plane stays up", stop.why)
                return 0
            hup = any(isinstance(u, updates.Reload) for u in batch)
            if hup:
                self._reload(source)
            due = time.monotonic() >= next_resync
            with self.lock:
                changed = self.receive(batch)
            host = [u for u in batch if isinstance(u, updates.HostChanged)]
            if host:
                self.facts_stale = True  # the host's networks moved: read them before the plan
            applied_before = self.changes_applied
            if changed or hup or due or host:
                self.refresh(reread=due or hup)
                if due:
                    next_resync = time.monotonic() + resync
            if host:  # netwatch.py: the host's networks changed; the plan above used their new facts
                took = (time.monotonic() - host[0].since) * 1000
                level = logging.INFO if self.changes_applied != applied_before else logging.DEBUG
                log.log(
                    level, "re-planned %.0f ms after the host's networks changed: %s", took, host[-1].summary
                )
                if self.reach is not None:
                    self.reach.stun.probe_now()  # a new network: maybe a new public address
                if self.link is not None:
                    self.link.network_changed()  # the long-poll rode the old address
                if self.paths is not None:
                    self.paths.network_changed()  # direct paths may have moved: check them now
            if batch or time.monotonic() >= next_tick:
                self.tick()
                if self.reach is not None:
                    self.reach.tick()
                if self.paths is not None:
                    self.paths.tick()
                next_tick = time.monotonic() + LED_TICK
            if self.snapshot is not None:
                self.snapshot.flush()
            self.traffic.flush()
            if time.monotonic() >= next_trim:
                heap.trim()  # what a burst of dumps or deltas left in the C heap goes back
                next_trim = time.monotonic() + heap.TRIM_EVERY

    def _reload(self, source: StaticFiles | None) -> None:
        """SIGHUP: the files again (hand edits), then a full resync."""
        log.info("reloading the state files and re-reading the kernel")
        if source is not None:
            source.reload()
            return
        try:
            fresh = self.load()
        except ConfigError as e:
            log.error("%s; keeping the last good state", e)
            self.last_error = str(e)
            return
        self.bus.put(updates.PrefsChanged(fresh.prefs))
        self.bus.put(updates.DevicesChanged(fresh.devices))

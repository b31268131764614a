"""The agent's main loop: reconcile the kernel toward a netmap and prefs, again
whenever either file changes, and every `resync` seconds from a fresh read.

Two sources of netmap, one loop:
- static mode: a netmap file someone else writes (`meshpi agent --netmap F --prefs F`);
- control mode (`meshpi agent`): the ControlLink thread long-polls control and
  writes `<state>/netmap.json`; prefs live in `<state>/prefs.json` (`meshpi up/set`).

Bad input never reaches the kernel: at start it ends the agent with the error
(exit 2); later it is logged and the last good state stays in place.

The loop also ticks the status LEDs every LED_TICK seconds, and the LocalAPI
(localapi.py) serves from threads of its own: kernel reads and applies from
either side hold `Agent.lock` (agentlocal.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from appliance.agent.agentlocal import AgentLocal
from appliance.agent.devices.hosted import DEVICES_FILE, load_devices
from appliance.agent.handshakes import carried_endpoints, handshake_targets, rotated_peers
from appliance.agent.leds import AgentLeds, LedOpener
from appliance.agent.reconcile import Reconciler
from appliance.agent.statedir import Owned, StateDir
from appliance.agent.watch import Watcher
from appliance.base.keys import PrivateKey, PublicKey
from appliance.core.model import HostedDevice, Scope, State
from appliance.core.planner import exit_node_problem, plan
from appliance.core.prefs import Prefs, load_prefs
from appliance.kernel.base import KernelError
from appliance.kernel.system import System
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import Netmap, load_netmap

log = logging.getLogger(__name__)

SystemFactory = Callable[[str], System]  # backend preference -> System
LED_TICK = 2.0  # seconds between looks at control and the tunnel's byte counters


class Service(Protocol):
    """Something the agent runs beside its loop (the LocalAPI), closed at exit."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class Inputs:
    netmap: Netmap
    prefs: Prefs
    devices: tuple[HostedDevice, ...] = ()  # phones this node hosts (devices.py)

    @property
    def scope(self) -> Scope:
        return Scope(self.prefs.interface, self.prefs.table, self.prefs.fwmark)


def offers(prefs: Prefs) -> dict[str, Any]:
    """What this node tells control it offers (protocol v1, `update`)."""
    return {
        "endpoints": [str(e) for e in prefs.advertise_endpoints],
        "advertise_routes": [str(r) for r in prefs.advertise_routes],
        "advertise_exit_node": prefs.advertise_exit_node,
    }


class Agent(AgentLocal):
    def __init__(
        self,
        netmap_path: Path,
        prefs_path: Path,
        state: StateDir,
        make_system: SystemFactory,
        control: bool = False,
        leds: LedOpener | None = None,
    ) -> None:
        self.netmap_path, self.prefs_path = netmap_path, prefs_path
        self.state, self.make_system, self.control = state, make_system, control
        self.key = state.node_key()
        self.system: System | None = None
        self.reconciler: Reconciler | None = None
        self.inputs: Inputs | None = None
        self.exit_problem: str | None = None  # why the chosen exit node carries nothing
        self._init_local(AgentLeds(leds))

    @classmethod
    def for_control(cls, state: StateDir, make_system: SystemFactory, leds: LedOpener | None = None) -> Agent:
        return cls(state.path / "netmap.json", state.path / "prefs.json", state, make_system, True, leds)

    def load_prefs(self) -> Prefs:
        if self.control and not self.prefs_path.exists():
            return Prefs()  # nobody ran `meshpi up/set` yet
        return load_prefs(self.prefs_path)

    @property
    def devices_path(self) -> Path:
        return self.state.path / DEVICES_FILE

    def load(self) -> Inputs:
        devices = tuple(d.hosted() for d in load_devices(self.devices_path)) if self.control else ()
        return Inputs(load_netmap(self.netmap_path), self.load_prefs(), devices)

    def desired(self, inputs: Inputs, system: System) -> State:
        problem = exit_node_problem(inputs.netmap, inputs.prefs)
        if problem != self.exit_problem:
            if problem is not None:
                log.warning("%s", problem)
            elif self.exit_problem is not None and inputs.prefs.exit_node is not None:
                log.info("exit node %r carries traffic again", inputs.prefs.exit_node)
            self.exit_problem = problem
        facts = system.facts(inputs.scope)
        # Moving to another interface name: the old one is meshpi's, not the host's
        # network, though it still holds the mesh prefix until the move is done.
        # Before the first apply that is the one owned.json records (read once, at start).
        if self.inputs is not None:
            previous: Scope | None = self.inputs.scope
        else:
            owned = self.state.owned()
            previous = owned.scope if owned is not None else None
        ours = {previous.interface} if previous is not None else set()
        if ours - {inputs.scope.interface}:
            facts = replace(facts, connected=tuple(c for c in facts.connected if c.dev not in ours))
        key = self._key_for(inputs.netmap)
        return plan(inputs.netmap, inputs.prefs, key, facts, str(self.netmap_path), inputs.devices)

    def _key_for(self, netmap: Netmap) -> PrivateKey:
        """The node key the netmap is for: after a rotation (controllink.py) that is
        the new key, whichever of node.key and node.key.next holds it right now."""
        wanted = netmap.self_node.public_key
        if self.key.public_key() != wanted:
            candidates = [self.state.node_key()]
            if self.state.rotation_pending():
                candidates.append(self.state.next_node_key())
            self.key = next((k for k in candidates if k.public_key() == wanted), self.key)
        return self.key

    def _carry_endpoints(self, before: Inputs, after: Inputs, desired: State) -> State:
        """A peer behind NAT that rotated its key: its new peer starts from where
        the old one had roamed to (handshakes.py)."""
        assert self.system is not None
        if before.netmap.peers == after.netmap.peers or not rotated_peers(before.netmap, after.netmap):
            return desired
        device = self.system.wireguard.read(after.scope.interface)
        learned = {k: s.endpoint for k, s in device.stats.items()} if device is not None else {}
        carried = carried_endpoints(before.netmap, after.netmap, learned)
        if not carried:
            return desired
        peers = dict(desired.peers)
        for key, endpoint in carried.items():
            peers[key] = replace(peers[key], endpoint=endpoint)
        return replace(desired, peers=peers)

    def _start_handshakes(self, before: Inputs, after: Inputs) -> None:
        """After a rotation, start the handshakes WireGuard would otherwise delay."""
        assert self.system is not None
        if before.netmap.self_node == after.netmap.self_node and before.netmap.peers == after.netmap.peers:
            return
        handshakes: dict[PublicKey, float | None] = {}
        if before.netmap.self_node.public_key != after.netmap.self_node.public_key:
            device = self.system.wireguard.read(after.scope.interface)
            if device is not None:
                handshakes = {k: s.last_handshake for k, s in device.stats.items()}
        for address in handshake_targets(before.netmap, after.netmap, handshakes, time.time()):
            try:
                self.system.links.probe(after.scope.interface, address)
            except KernelError as e:
                log.warning("could not start a handshake with %s: %s", address, e)

    def start(self) -> None:
        """Load, check and apply once. Raises ConfigError before any kernel change."""
        inputs = self.load()
        self.system = self.make_system(inputs.prefs.backend)
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

    def update(self, reread: bool) -> None:
        """Files changed or a resync is due: re-plan and apply what differs."""
        if self.inputs is None:
            if self.may_start():
                self.start()
            return
        assert self.system is not None and self.reconciler is not None
        try:
            inputs = self.load()
            desired = self.desired(inputs, self.system)
        except ConfigError as e:
            log.error("%s; keeping the last good state", e)
            self.last_error = str(e)
            return
        if inputs.scope != self.inputs.scope:
            self._sync(Reconciler(self.system, self.inputs.scope), State())
            self.state.record_owned(Owned(inputs.scope, self.system.wireguard.name))
            self.reconciler = Reconciler(self.system, inputs.scope)
        before, self.inputs = self.inputs, inputs
        desired = self._carry_endpoints(before, inputs, desired)
        applied = self._sync(self.reconciler, desired, reread=reread)
        if applied:
            log.info("applied %d change(s)", len(applied))
            self._start_handshakes(before, inputs)

    def refresh(self, reread: bool) -> None:
        """update() under the kernel lock; a failure is logged, shown on the
        LEDs, and tried again at the next change or resync."""
        with self.lock:
            self.last_error = None
            try:
                self.update(reread)
            except ConfigError as e:
                log.error("%s; waiting for a good one", e)
                self.last_error = str(e)
            except KernelError as e:
                log.error("%s; will retry at the next resync", e)
                self.last_error = str(e)

    def run(self, resync: float = 30.0, serve: Callable[[Agent], Service] | None = None) -> int:
        """Serve until SIGTERM/SIGINT. `serve` starts the LocalAPI, once this
        agent holds the state directory's lock (never another agent's socket)."""
        self.state.lock()
        link = None
        watched = [self.netmap_path, self.prefs_path]
        if self.control:
            from appliance.agent.control.link import ControlLink

            link = ControlLink(self.state, self.load_prefs, offers, self.netmap_path)
            watched += [link.login_path, self.devices_path]
            self.link = link
            self.mark_connecting()
        signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        watcher = Watcher(watched, signals=signals)
        logging.getLogger().addHandler(self.logs)
        server = None
        try:
            server = serve(self) if serve is not None else None
            self.tick()
            with self.lock:
                if self.may_start() or not self.control:
                    self.start()
                else:
                    log.info("no netmap yet: waiting for control")
            if link is not None:
                link.start()
            return self._loop(watcher, link, resync)
        finally:
            if server is not None:
                server.close()
            if link is not None:
                link.stop()
            watcher.close()
            self.leds.close()
            logging.getLogger().removeHandler(self.logs)

    def _loop(self, watcher: Watcher, link: Any, resync: float) -> int:
        next_resync = time.monotonic() + resync
        next_tick = time.monotonic()
        while True:
            changed = watcher.wait(min(next_resync, next_tick) - time.monotonic())
            stop = {signal.SIGTERM, signal.SIGINT} & set(watcher.signals)
            if stop:
                # The interface and the table stay up: a restarted agent takes them over.
                log.info("stopping on %s; the data plane stays up", signal.Signals(stop.pop()).name)
                return 0
            hup = signal.SIGHUP in watcher.signals
            watcher.signals.clear()
            due = time.monotonic() >= next_resync
            if link is not None:
                if self.prefs_path in changed:
                    link.offers_changed()
                if link.login_path in changed:
                    link.login_changed()
            if changed or hup or due:
                if changed:
                    log.info("%s changed", ", ".join(sorted(p.name for p in changed)))
                self.refresh(reread=due or hup)
                if due:
                    next_resync = time.monotonic() + resync
            if changed or hup or time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + LED_TICK


def down(state: StateDir, make_system: SystemFactory) -> int:
    """Remove everything meshpi owns and restore the sysctls it changed."""
    pid = state.stop_running_agent()
    if pid is not None:
        log.info("stopped agent pid %d", pid)
    owned = state.owned()
    if owned is None:
        log.info("meshpi owns nothing here (%s has no record); nothing to do", state.path)
        return 0
    system = make_system(owned.backend)
    Reconciler(system, owned.scope).sync(State(), reread=True)
    state.forget_owned()
    log.info("meshpi is down: %s, its rules, routes and table are gone", owned.scope.interface)
    return 0

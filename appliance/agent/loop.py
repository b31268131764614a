"""The agent's main loop: reconcile the kernel toward a netmap and prefs, again
whenever either file changes, and every `resync` seconds from a fresh read.

Two sources of netmap, one loop:
- static mode: a netmap file someone else writes (`meshpi agent --netmap F --prefs F`);
- control mode (`meshpi agent`): the ControlLink thread long-polls control and
  writes `<state>/netmap.json`; prefs live in `<state>/prefs.json` (`meshpi up/set`).

Bad input never reaches the kernel: at start it ends the agent with the error
(exit 2); later it is logged and the last good state stays in place.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.agent.reconcile import Reconciler
from appliance.agent.statedir import Owned, StateDir
from appliance.agent.watch import Watcher
from appliance.core.model import Scope, State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs, load_prefs
from appliance.kernel.base import KernelError
from appliance.kernel.system import System
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import Netmap, load_netmap

log = logging.getLogger(__name__)

SystemFactory = Callable[[str], System]  # backend preference -> System


@dataclass(frozen=True)
class Inputs:
    netmap: Netmap
    prefs: Prefs

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


class Agent:
    def __init__(
        self,
        netmap_path: Path,
        prefs_path: Path,
        state: StateDir,
        make_system: SystemFactory,
        control: bool = False,
    ) -> None:
        self.netmap_path, self.prefs_path = netmap_path, prefs_path
        self.state, self.make_system, self.control = state, make_system, control
        self.key = state.node_key()
        self.system: System | None = None
        self.reconciler: Reconciler | None = None
        self.inputs: Inputs | None = None

    @classmethod
    def for_control(cls, state: StateDir, make_system: SystemFactory) -> Agent:
        return cls(state.path / "netmap.json", state.path / "prefs.json", state, make_system, True)

    def load_prefs(self) -> Prefs:
        if self.control and not self.prefs_path.exists():
            return Prefs()  # nobody ran `meshpi up/set` yet
        return load_prefs(self.prefs_path)

    def load(self) -> Inputs:
        return Inputs(load_netmap(self.netmap_path), self.load_prefs())

    def desired(self, inputs: Inputs, system: System) -> State:
        facts = system.facts(inputs.scope)
        return plan(inputs.netmap, inputs.prefs, self.key, facts, source=str(self.netmap_path))

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
            Reconciler(self.system, previous.scope).sync(State())
        self.state.record_owned(Owned(inputs.scope, self.system.wireguard.name))
        self.reconciler = Reconciler(self.system, inputs.scope)
        applied = self.reconciler.sync(desired, reread=True)
        if applied:
            log.info("applied %d change(s); %s is up", len(applied), inputs.scope.interface)
        else:
            log.info("took over %s: the kernel already matches, no changes", inputs.scope.interface)
        self.inputs = inputs

    def update(self, reread: bool) -> None:
        """Files changed or a resync is due: re-plan and apply what differs."""
        if self.inputs is None:
            if self.netmap_path.exists():
                self.start()
            return
        assert self.system is not None and self.reconciler is not None
        try:
            inputs = self.load()
            desired = self.desired(inputs, self.system)
        except ConfigError as e:
            log.error("%s; keeping the last good state", e)
            return
        if inputs.scope != self.inputs.scope:
            Reconciler(self.system, self.inputs.scope).sync(State())
            self.state.record_owned(Owned(inputs.scope, self.system.wireguard.name))
            self.reconciler = Reconciler(self.system, inputs.scope)
        self.inputs = inputs
        applied = self.reconciler.sync(desired, reread=reread)
        if applied:
            log.info("applied %d change(s)", len(applied))

    def run(self, resync: float = 30.0) -> int:
        self.state.lock()
        link = None
        watched = [self.netmap_path, self.prefs_path]
        if self.control:
            from appliance.agent.controllink import ControlLink

            link = ControlLink(self.state, self.key, self.load_prefs, offers, self.netmap_path)
            watched.append(link.login_path)
        signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        watcher = Watcher(watched, signals=signals)
        try:
            if self.netmap_path.exists() or not self.control:
                self.start()
            else:
                log.info("no netmap yet: waiting for control")
            if link is not None:
                link.start()
            return self._loop(watcher, link, resync)
        finally:
            if link is not None:
                link.stop()
            watcher.close()

    def _loop(self, watcher: Watcher, link: Any, resync: float) -> int:
        next_resync = time.monotonic() + resync
        while True:
            changed = watcher.wait(next_resync - time.monotonic())
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
                try:
                    self.update(reread=due or hup)
                except ConfigError as e:
                    log.error("%s; waiting for a good one", e)
                except KernelError as e:
                    log.error("%s; will retry at the next resync", e)
                if due:
                    next_resync = time.monotonic() + resync


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

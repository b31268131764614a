"""The agent in static mode: reconcile the kernel toward a netmap file and a prefs
file, again whenever either changes, and every `resync` seconds from a fresh read.

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


class StaticAgent:
    def __init__(
        self, netmap_path: Path, prefs_path: Path, state: StateDir, make_system: SystemFactory
    ) -> None:
        self.netmap_path, self.prefs_path = netmap_path, prefs_path
        self.state, self.make_system = state, make_system
        self.key = state.node_key()
        self.system: System | None = None
        self.reconciler: Reconciler | None = None
        self.inputs: Inputs | None = None

    def load(self) -> Inputs:
        return Inputs(load_netmap(self.netmap_path), load_prefs(self.prefs_path))

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
                previous.scope.interface,
                inputs.scope.interface,
            )
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
        assert self.system is not None and self.reconciler is not None and self.inputs is not None
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
        watcher = Watcher(
            [self.netmap_path, self.prefs_path],
            signals=[signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
        )
        try:
            self.start()
            next_resync = time.monotonic() + resync
            while True:
                changed = watcher.wait(next_resync - time.monotonic())
                stop = {signal.SIGTERM, signal.SIGINT} & set(watcher.signals)
                if stop:
                    # The interface and the table stay up: a restarted agent takes them over.
                    log.info(
                        "stopping on %s; the data plane stays up", signal.Signals(stop.pop()).name
                    )
                    return 0
                hup = signal.SIGHUP in watcher.signals
                watcher.signals.clear()
                due = time.monotonic() >= next_resync
                if changed or hup or due:
                    if changed:
                        log.info("%s changed", ", ".join(sorted(p.name for p in changed)))
                    try:
                        self.update(reread=due or hup)
                    except KernelError as e:
                        log.error("%s; will retry at the next resync", e)
                    if due:
                        next_resync = time.monotonic() + resync
        finally:
            watcher.close()


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

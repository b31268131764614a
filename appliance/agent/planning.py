"""From the wanted inputs to the State the kernel should hold: the inputs read
from the state directory (control) or the files (static), and the plan made
from them, with the host's networks cached between netlink events and the node
key followed across a rotation.

A mixin of `Agent` (loop.py), apart from the loop because it decides *what* to
apply, not when: it reads files and plans, and changes nothing in the kernel.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from appliance.agent.commands import current_prefs
from appliance.agent.devices.hosted import kernel_devices, load_devices
from appliance.agent.inputs import Inputs, Wanted
from appliance.agent.statedir import StateDir
from appliance.base.keys import PrivateKey
from appliance.core.conflicts import RouteConflict
from appliance.core.model import HostFacts, Scope, State
from appliance.core.planner import PeerMemo, exit_node_problem, make_plan
from appliance.core.prefs import Prefs, load_prefs
from appliance.kernel.system import System
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import Netmap, load_netmap

log = logging.getLogger(__name__)


class AgentPlanning:
    # Set by Agent.__init__ (loop.py).
    netmap_path: Path
    prefs_path: Path
    state: StateDir
    control: bool
    key: PrivateKey
    inputs: Inputs | None
    exit_problem: str | None
    conflicts: tuple[RouteConflict, ...]
    memo: PeerMemo
    _facts: tuple[Scope, HostFacts] | None
    facts_stale: bool

    def load_prefs(self) -> Prefs:
        """Static mode needs its prefs file; in control mode none yet means defaults
        (nobody ran `meshpi up/set`)."""
        return current_prefs(self.prefs_path) if self.control else load_prefs(self.prefs_path)

    def load(self) -> Wanted:
        """The inputs from the state directory (control) or the files (static),
        at start and on SIGHUP; raises ConfigError naming file, field and value."""
        prefs = self.load_prefs()
        if not self.control:
            return Wanted(load_netmap(self.netmap_path), prefs)
        devices = kernel_devices(load_devices(self.state.devices_file))
        netmap = None
        if self.netmap_path.exists() and self.state.login_file.exists():
            try:
                netmap = load_netmap(self.netmap_path)  # the snapshot: control sends a full map soon
            except ConfigError as e:
                # Only a snapshot: never a reason to stop (control sends a full map).
                log.warning("%s; starting without it, waiting for control's netmap", e)
            netmap = self._snapshot_for_us(netmap)
        return Wanted(netmap, prefs, devices)

    def _snapshot_for_us(self, netmap: Netmap | None) -> Netmap | None:
        """A snapshot made before a key rotation was committed (the agent lost
        power before the next snapshot) names a key this node no longer holds:
        stale, so the agent starts without it rather than refusing to start."""
        if netmap is None:
            return None
        ours = {self.state.node_key().public_key()}
        if self.state.rotation_pending():
            ours.add(self.state.next_node_key().public_key())
        if netmap.self_node.public_key in ours:
            return netmap
        log.warning("%s is for key %s, no longer this node's: waiting for control's netmap",
                    self.netmap_path, netmap.self_node.public_key)  # fmt: skip
        return None

    def desired(self, inputs: Inputs, system: System) -> State:
        problem = exit_node_problem(inputs.netmap, inputs.prefs)
        if problem != self.exit_problem:
            if problem is not None:
                log.warning("%s", problem)
            elif self.exit_problem is not None and inputs.prefs.exit_node is not None:
                log.info("exit node %r carries traffic again", inputs.prefs.exit_node)
            self.exit_problem = problem
        facts = self._host_facts(inputs.scope, system)
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
        planned = make_plan(
            inputs.netmap, inputs.prefs, key, facts, str(self.netmap_path), inputs.devices, self.memo
        )
        if planned.conflicts != self.conflicts:
            for conflict in set(planned.conflicts) - set(self.conflicts):
                log.warning("%s", conflict)
            self.conflicts = planned.conflicts
        return planned.state

    def _host_facts(self, scope: Scope, system: System) -> HostFacts:
        """The host's networks, read again only when they may have changed: at a
        resync or SIGHUP (`facts_stale`), for another interface, or after a
        netlink event about the host's links, addresses or routes. A netmap
        delta does not re-read them: a netlink dump costs ~10 ms on a Pi."""
        cached = self._facts
        if self.facts_stale or cached is None or cached[0] != scope:
            self._facts = cached = (scope, system.facts(scope))
            self.facts_stale = False
        return cached[1]

    def _key_for(self, netmap: Netmap) -> PrivateKey:
        """The node key the netmap is for: after a rotation (control/link.py) that is
        the new key, whichever of node.key and node.key.next holds it right now."""
        wanted = netmap.self_node.public_key
        if self.key.public_key() != wanted:
            candidates = [self.state.node_key()]
            if self.state.rotation_pending():
                candidates.append(self.state.next_node_key())
            self.key = next((k for k in candidates if k.public_key() == wanted), self.key)
        return self.key

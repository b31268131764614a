"""Move the kernel toward a desired State, and remember what it holds.

After a fully successful apply the kernel holds the desired state, so the next
diff starts from that instead of re-reading a thousand peers: a one-peer change
costs one peer. After a failure, at start and on every resync the kernel is read
again, so drift (someone ran `wg set` by hand) is repaired.
"""

from __future__ import annotations

import logging

from appliance.core.changes import Change
from appliance.core.diff import diff
from appliance.core.model import Scope, State
from appliance.kernel.system import System

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, system: System, scope: Scope) -> None:
        self.system, self.scope = system, scope
        self._known: State | None = None

    def sync(self, desired: State, reread: bool = False) -> list[Change]:
        """Apply what differs; return the changes applied. Raises ApplyError."""
        if reread or self._known is None:
            self._known = self.system.read(self.scope)
        changes = diff(self._known, desired)
        if not changes:
            log.debug("in sync: no changes")
            return []
        self._known = None  # unknown until the apply completes
        applied = self.system.apply(changes)
        self._known = desired
        return applied

"""`meshpi down`: stop the agent if one runs, then remove everything meshpi owns (cli)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from appliance.agent.dns.host import restore_after_down
from appliance.agent.reconcile import Reconciler
from appliance.agent.statedir import StateDir
from appliance.core.model import State
from appliance.kernel.system import System

log = logging.getLogger(__name__)


def down(state: StateDir, make_system: Callable[[str], System]) -> int:
    """Remove everything meshpi owns and restore the sysctls it changed."""
    pid = state.stop_running_agent()
    if pid is not None:
        log.info("stopped agent pid %d", pid)
    restore_after_down(state.hostdns_file)
    owned = state.owned()
    if owned is None:
        log.info("meshpi owns nothing here (%s has no record); nothing to do", state.path)
        return 0
    system = make_system(owned.backend)
    Reconciler(system, owned.scope).sync(State(), reread=True)
    state.forget_owned()
    log.info("meshpi is down: %s, its rules, routes and table are gone", owned.scope.interface)
    return 0

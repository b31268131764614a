"""The owner's verbs (`up`, `set`, `logout`), carried out on the state directory.

The agent runs them when the LocalAPI asks (`meshpi up/set/logout` and the web
UI are its clients); `meshpi set` also runs `set_prefs` itself when no agent
runs, so prefs can be chosen before the first start. There is one
implementation of each verb, here.

They store what the owner chose (prefs.json, login.json) atomically, for the
next start, and the running agent hears of it in memory: prefs go to the loop
on the bus, a login wakes the control link, and `up` waits on the link's status.
Prefs are checked with the agent's own parser before anything is written, so a
bad value changes nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.agent.statedir import StateDir
from appliance.base.files import atomic_write
from appliance.core.prefs import Prefs, dump_prefs, load_prefs, parse_prefs

if TYPE_CHECKING:
    from appliance.agent.control.link import ControlLink

log = logging.getLogger(__name__)

UP_WAIT = 20.0  # seconds `up` waits for control's answer
ANSWERED = ("connected", "pending", "error")  # link states that answer an `up`

# CLI flag -> prefs field; a flag left out leaves its pref as it was.
PREF_FLAGS = {
    "advertise_exit_node": "advertise_exit_node",
    "advertise_routes": "advertise_routes",
    "advertise_endpoints": "advertise_endpoints",
    "public_endpoint": "public_endpoint",
    "advertise_dns": "advertise_dns",
    "exit_node": "exit_node",
    "exit_node_allow_lan_access": "exit_node_allow_lan_access",
    "hostname": "hostname",
    "backend": "backend",
    "interface": "interface",
    "mtu": "mtu",
    "listen_port": "listen_port",
    "led_pins": "led_pins",
    "act_led": "act_led",
    "port_mapping": "port_mapping",
    "dashboard_from_mesh": "dashboard_from_mesh",
    "dashboard_port": "dashboard_port",
    "ssh_port": "ssh_port",
    "accept_dns": "accept_dns",
    "auto_upgrades": "auto_upgrades",
    "upgrade_window": "upgrade_window",
    "flowtable": "flowtable",
    "udp_gro_forwarding": "udp_gro_forwarding",
}


def current_prefs(path: Path) -> Prefs:
    return load_prefs(path) if path.exists() else Prefs()


def set_prefs(path: Path, changes: dict[str, Any]) -> Prefs:
    """Merge the changes into the stored prefs, check, and write them."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = current_prefs(path).to_json() | changes
    prefs = parse_prefs(doc, "prefs")  # the agent's own check, before any write
    atomic_write(path, dump_prefs(prefs))
    return prefs


def up(state: StateDir, link: ControlLink, set_prefs: Any, login_server: str, auth_key: str | None,
       changes: dict[str, Any], wait: float = UP_WAIT) -> dict[str, Any]:  # fmt: skip
    """Store the login and the prefs, wake the link, and wait for control's answer.
    `set_prefs(changes) -> Prefs` is the agent's own (it reaches the loop too)."""
    from appliance.wire.loginurl import parse_login_url

    parse_login_url(login_server)  # a bad URL is refused here, not in the agent's log
    prefs = set_prefs(changes)
    before = link.status.seq
    login = {"server": login_server, "auth_key": auth_key}
    atomic_write(state.login_file, json.dumps(login) + "\n", mode=0o600)
    link.login_changed()
    answer = link.wait_for(before, ANSWERED, wait)
    if answer is None:
        return {"state": "timeout", "detail": f"no answer from control within {wait:g} s",
                "prefs": prefs.to_json()}  # fmt: skip
    return answer.to_json()


def logout(state: StateDir) -> str:
    """Tell control this node leaves and forget the login. The agent then takes
    the data plane down. Raises ControlError when control cannot be told."""
    from appliance.agent.control.client import ControlClient, ControlRefused
    from appliance.agent.control.link import Login
    from appliance.wire.loginurl import parse_login_url

    login = Login.load(state.login_file)
    if login is None:
        return "not logged in"
    base, control_pub = parse_login_url(login.server)
    try:
        ControlClient(base, state.machine_key(), control_pub, timeout=10).call("logout", {})
    except ControlRefused as e:
        if e.status not in (403, 404):
            raise
        # Control no longer knows this node (removed by the admin): nothing to tell it.
        state.login_file.unlink(missing_ok=True)
        return f"logged out here; control at {base} no longer knew this node ({e.message})"
    state.login_file.unlink(missing_ok=True)
    return f"logged out of {base}"


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}

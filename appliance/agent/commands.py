"""The owner's verbs (`up`, `set`, `logout`), carried out on the state directory.

The agent runs them when the LocalAPI asks (`meshpi up/set/logout` and the web
UI are its clients); `meshpi set` also runs `set_prefs` itself when no agent
runs, so prefs can be chosen before the first start. There is one
implementation of each verb, here.

They write what the owner chose (prefs.json, login.json) atomically; the agent's
loop watches those files and its control link acts on them. Prefs are checked
with the agent's own parser before anything is written, so a bad value changes
nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from appliance.agent.statedir import StateDir
from appliance.base.files import atomic_write
from appliance.core.prefs import Prefs, dump_prefs, load_prefs, parse_prefs

log = logging.getLogger(__name__)

UP_WAIT = 20.0  # seconds `up` waits for control's answer
ANSWERED = ("connected", "pending", "error")  # control-status.json states that answer an `up`

# CLI flag -> prefs field; a flag left out leaves its pref as it was.
PREF_FLAGS = {
    "advertise_exit_node": "advertise_exit_node",
    "advertise_routes": "advertise_routes",
    "advertise_endpoints": "advertise_endpoints",
    "exit_node": "exit_node",
    "exit_node_allow_lan_access": "exit_node_allow_lan_access",
    "hostname": "hostname",
    "backend": "backend",
    "interface": "interface",
    "mtu": "mtu",
    "listen_port": "listen_port",
    "led_pins": "led_pins",
    "act_led": "act_led",
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


def up(state: StateDir, prefs_path: Path, login_server: str, auth_key: str | None,
       changes: dict[str, Any], wait: float = UP_WAIT) -> dict[str, Any]:  # fmt: skip
    """Store the login and the prefs, then wait for the control link's answer."""
    from appliance.wire.seal import parse_login_url

    parse_login_url(login_server)  # a bad URL is refused here, not in the agent's log
    prefs = set_prefs(prefs_path, changes)
    status_path = state.path / "control-status.json"
    before = mtime(status_path)
    login = {"server": login_server, "auth_key": auth_key}
    atomic_write(state.path / "login.json", json.dumps(login) + "\n", mode=0o600)
    answer = wait_for_status(status_path, before, ANSWERED, wait)
    if answer is None:
        return {"state": "timeout", "detail": f"no answer from control within {wait:g} s",
                "prefs": prefs.to_json()}  # fmt: skip
    return answer


def logout(state: StateDir) -> str:
    """Tell control this node leaves and forget the login. The agent then takes
    the data plane down. Raises ControlError when control cannot be told."""
    from appliance.agent.control.client import ControlClient
    from appliance.agent.control.link import Login
    from appliance.wire.seal import parse_login_url

    login_path = state.path / "login.json"
    login = Login.load(login_path)
    if login is None:
        return "not logged in"
    base, control_pub = parse_login_url(login.server)
    ControlClient(base, state.machine_key(), control_pub, timeout=10).call("logout", {})
    login_path.unlink(missing_ok=True)
    return f"logged out of {base}"


def wait_for_status(path: Path, before: int | None, states: tuple[str, ...],
                    wait: float) -> dict[str, Any] | None:  # fmt: skip
    """The control link's status once it was rewritten (mtime not `before`) with
    one of `states`; None if that did not happen within `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if mtime(path) != before:
            status = read_json(path)
            if status.get("state") in states:
                return status
        time.sleep(0.1)
    return None


def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}

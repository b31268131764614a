"""`meshpi up`, `set`, `status`, `logout`: the owner's verbs, on the state directory.

They write what the owner chose (prefs.json, login.json) atomically, and the
running agent picks it up (it watches those files); they read what the agent and
its control link report. Prefs are checked with the agent's own parser before
anything is written, so a bad flag changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from appliance.agent.files import atomic_write
from appliance.agent.statedir import StateDir
from appliance.core.prefs import Prefs, dump_prefs, load_prefs, parse_prefs
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import load_netmap

log = logging.getLogger(__name__)

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
}


def current_prefs(state: StateDir) -> Prefs:
    path = state.path / "prefs.json"
    return load_prefs(path) if path.exists() else Prefs()


def set_prefs(state: StateDir, changes: dict[str, Any]) -> Prefs:
    """Merge the changes into the stored prefs, check, and write them."""
    state.ensure()
    doc = current_prefs(state).to_json() | changes
    prefs = parse_prefs(doc, "prefs")  # the agent's own check, before any write
    atomic_write(state.path / "prefs.json", dump_prefs(prefs))
    return prefs


def up(state: StateDir, login_server: str, auth_key: str | None, changes: dict[str, Any],
       wait: float) -> dict[str, Any]:  # fmt: skip
    from appliance.wire.seal import parse_login_url

    parse_login_url(login_server)  # a bad URL is refused here, not in the agent's log
    prefs = set_prefs(state, changes)
    status_path = state.path / "control-status.json"
    before = _mtime(status_path)
    login = {"server": login_server, "auth_key": auth_key}
    atomic_write(state.path / "login.json", json.dumps(login) + "\n", mode=0o600)
    if not state.agent_running():
        return {"state": "agent-not-running", "detail": "start it: systemctl start meshpi-agent",
                "prefs": prefs.to_json()}  # fmt: skip
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if _mtime(status_path) != before:
            status = _read(status_path)
            if status.get("state") in ("connected", "pending", "error"):
                return status
        time.sleep(0.1)
    return {"state": "timeout", "detail": f"no answer from the agent within {wait:g} s"}


def status(state: StateDir) -> dict[str, Any]:
    """What the agent, its control link and the kernel say about this node."""
    out: dict[str, Any] = {"agent": "running" if state.agent_running() else "stopped"}
    out["control"] = _read(state.path / "control-status.json") or {"state": "static or unknown"}
    netmap_path = state.path / "netmap.json"
    owned = state.owned()
    if not netmap_path.exists():
        return out
    try:
        netmap = load_netmap(netmap_path)
    except ConfigError as e:
        out["error"] = str(e)
        return out
    me = netmap.self_node
    out["self"] = {"name": me.name, "addresses": [str(a) for a in me.addresses]}
    stats: dict[Any, Any] = {}
    if owned is not None:
        from appliance.kernel.wireguard import choose_backend

        device = choose_backend(owned.backend).read(owned.scope.interface)
        stats = dict(device.stats) if device is not None else {}
        out["interface"] = owned.scope.interface if device is not None else None
    now = time.time()
    peers = []
    for peer in netmap.peers:
        s = stats.get(peer.public_key)
        handshake = s.last_handshake if s is not None else None
        peers.append({
            "name": peer.name,
            "addresses": [str(a) for a in peer.addresses],
            "routes": [str(r) for r in peer.routes],
            "endpoint": str(s.endpoint) if s is not None and s.endpoint else None,
            # WireGuard rekeys every 2 minutes while traffic flows: a handshake in
            # the last 3 minutes means the peer is there.
            "online": handshake is not None and now - handshake < 180,
            "last_handshake": handshake,
            "rx_bytes": s.rx_bytes if s is not None else 0,
            "tx_bytes": s.tx_bytes if s is not None else 0,
        })  # fmt: skip
    out["peers"] = peers
    return out


def format_status(st: dict[str, Any]) -> str:
    lines = [f"agent: {st['agent']}"]
    control = st.get("control", {})
    lines.append(f"control: {control.get('state')} {control.get('detail', '')}".rstrip())
    if "self" in st:
        lines.append(f"this node: {st['self']['name']} {' '.join(st['self']['addresses'])}")
    for p in st.get("peers", []):
        hs = p["last_handshake"]
        ago = f"{time.time() - hs:.0f}s ago" if hs else "never"
        lines.append(
            f"  {p['name']:<16} {p['addresses'][0]:<15} {'online' if p['online'] else 'offline':<8}"
            f" handshake {ago:<10} rx {p['rx_bytes']} tx {p['tx_bytes']}"
            + (f" via {p['endpoint']}" if p["endpoint"] else "")
        )
    return "\n".join(lines)


def logout(state: StateDir) -> str:
    """Tell control this node leaves; forget the login. The caller then runs down."""
    from appliance.agent.control_client import ControlClient
    from appliance.agent.controllink import Login
    from appliance.wire.seal import parse_login_url

    login_path = state.path / "login.json"
    login = Login.load(login_path)
    if login is None:
        return "not logged in"
    base, control_pub = parse_login_url(login.server)
    ControlClient(base, state.machine_key(), control_pub, timeout=10).call("logout", {})
    login_path.unlink(missing_ok=True)
    (state.path / "netmap.json").unlink(missing_ok=True)
    return f"logged out of {base}"


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}

"""Everything connected to this node, in one list, and the one-line headline.

The agent says both in /v1/status (`connected`, `headline`). An agent that predates
them still has `peers` and `devices`: those become the same rows, so the page never
has two lists. `/part/live` is the live region of the dashboard (headline, rows,
totals) rendered by the same templates as the page, so the script swaps HTML in and
never builds rows of its own; while the agent is down it is the web UI's own
"agent not running" headline.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, jsonify, render_template, request
from werkzeug.wrappers import Response

from webui.agent import AgentNotRunning, LocalAPIError, agent, status

log = logging.getLogger(__name__)
bp = Blueprint("live", __name__)

KINDS = {"pi": "Pi", "computer": "computer", "phone": "phone"}
STATES = {"online": "online", "idle": "idle", "never": "never connected"}
# The most a page may ask of the agent's history: its ring holds 24 h.
MAX_MINUTES = 24 * 60


def _rows_from_peers(st: dict[str, Any]) -> list[dict[str, Any]]:
    """`connected` from `peers` and `devices`, for an agent without it."""
    rows = []
    for p in st.get("peers") or []:
        if not isinstance(p, dict):
            continue
        seen = p.get("last_handshake")
        rows.append({
            "id": p.get("public_key"), "name": p.get("name"), "device_id": None,
            "kind": "pi" if p.get("exit_node") or p.get("routes") else "computer",
            "addresses": p.get("addresses") or [], "dns_name": None,
            "state": "online" if p.get("online") else ("idle" if seen else "never"),
            "last_seen": seen, "path": p.get("path"), "uses_exit": False,
            "rx_bytes": p.get("rx_bytes", 0), "tx_bytes": p.get("tx_bytes", 0), "enabled": True,
        })  # fmt: skip
    for d in st.get("devices") or []:
        if not isinstance(d, dict):
            continue
        seen = d.get("last_handshake")
        endpoint = d.get("endpoint")
        rows.append({
            "id": d.get("public_key"), "name": d.get("name"), "device_id": d.get("id"), "kind": "phone",
            "addresses": d.get("addresses") or [], "dns_name": None,
            "state": "online" if d.get("online") else ("idle" if seen else "never"),
            "last_seen": seen, "path": f"direct {endpoint}" if endpoint else None, "uses_exit": False,
            "rx_bytes": d.get("rx_bytes", 0), "tx_bytes": d.get("tx_bytes", 0), "enabled": True,
        })  # fmt: skip
    return rows


def connected_rows(st: dict[str, Any]) -> list[dict[str, Any]]:
    rows = st.get("connected")
    if isinstance(rows, list):
        return [r for r in rows if isinstance(r, dict)]
    return _rows_from_peers(st)


def _names(rows: list[dict[str, Any]]) -> str:
    names = [str(r.get("name")) for r in rows]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def headline(st: dict[str, Any]) -> dict[str, Any]:
    """The agent's headline, or one made from the control state for an agent without it."""
    given = st.get("headline")
    if isinstance(given, dict) and isinstance(given.get("text"), str):
        facts = given.get("facts")
        facts = facts if isinstance(facts, dict) else {}
        level = given.get("level") if given.get("level") in ("ok", "warn", "error") else "warn"
        return {"level": level, "text": given["text"], "why": facts.get("why"), "fix": facts.get("fix")}
    control = st.get("control") if isinstance(st.get("control"), dict) else {}
    assert isinstance(control, dict)
    state = control.get("state")
    if state not in ("connected", "static"):
        detail = control.get("detail")
        return {"level": "warn" if state in ("connecting", "pending") else "error",
                "text": f"Not connected to the mesh ({state})", "why": detail, "fix": None}  # fmt: skip
    users = [r for r in connected_rows(st) if r.get("uses_exit")]
    text = "Everything works"
    if users:
        text += f" · exit node used by {_names(users)}"
    return {"level": "ok", "text": text, "why": None, "fix": None}


def agent_down_headline() -> dict[str, Any]:
    return {
        "level": "error",
        "text": "The meshpi agent is not running",
        "why": "The dashboard cannot reach it, so nothing here is current.",
        "fix": "on the Pi, sudo systemctl restart meshpi-agent (journalctl -u meshpi-agent says why).",
    }


def live_context(st: dict[str, Any]) -> dict[str, Any]:
    """What the live templates need: rows, totals, headline."""
    rows = connected_rows(st)
    return {
        "rows": rows,
        "headline": headline(st),
        "rx_total": sum(int(r.get("rx_bytes") or 0) for r in rows),
        "tx_total": sum(int(r.get("tx_bytes") or 0) for r in rows),
        "now": time.time(),
    }


@bp.get("/part/live")
def live() -> tuple[str, int]:
    try:
        st = status()
    except AgentNotRunning:
        return render_template("live.html", down=True, headline=agent_down_headline(), rows=[], rx_total=0,
                               tx_total=0, now=time.time()), 503  # fmt: skip
    back = "devices" if request.args.get("back") == "devices" else "dashboard"
    return render_template("live.html", down=False, back=back, **live_context(st)), 200


@bp.get("/api/traffic")
def traffic() -> Response | tuple[Response, int]:
    """The agent's traffic history (bytes per minute, oldest first), as it gives it."""
    minutes = request.args.get("minutes", "60")
    if not minutes.isdigit() or not 1 <= int(minutes) <= MAX_MINUTES:
        return jsonify(error=f"minutes must be 1-{MAX_MINUTES}, not {minutes!r}"), 400
    try:
        doc = agent().get(f"/v1/traffic?minutes={int(minutes)}")
    except AgentNotRunning:
        raise
    except LocalAPIError as e:
        if e.status == 404:  # an agent that keeps no history yet
            return jsonify(step=60, end=time.time(), total={"rx": [], "tx": []}, peers={}, missing=True)
        raise
    return jsonify(doc)

"""Everything connected to this node, in one list, and the one-line headline.

The agent says both in /v1/status (`connected`, `headline`; LOCALAPI.md says how
they are made). `/part/live` is the live region of the dashboard (headline, rows,
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

from appliance.client.headline import agent_down
from webui.agent import AgentNotRunning, agent, status

log = logging.getLogger(__name__)
bp = Blueprint("live", __name__)

ENDPOINT_FIELD = "This Pi's address from the internet"
# The most a page may ask of the agent's history: its ring holds 24 h.
MAX_MINUTES = 24 * 60


def connected_rows(st: dict[str, Any]) -> list[dict[str, Any]]:
    rows = st.get("connected")
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def headline(given: object) -> dict[str, Any]:
    """The agent's headline (or client.headline's when it is down) for the template."""
    if not isinstance(given, dict) or not isinstance(given.get("text"), str):
        return {"level": "warn", "text": "This agent says nothing about its health (an older version?)",
                "why": None, "fix": None}  # fmt: skip
    facts = given.get("facts")
    facts = facts if isinstance(facts, dict) else {}
    level = given.get("level") if given.get("level") in ("ok", "warn", "error") else "warn"
    text, fix = given["text"], facts.get("fix")
    if isinstance(fix, str):
        # The dashboard has a field where the CLI has a flag.
        fix = fix.replace("give it with --advertise-endpoint", f"give it in Settings ({ENDPOINT_FIELD})")
        # The sentence carries its fix for the CLI; the page shows the fix below it.
        text = text.removesuffix("; " + str(facts.get("fix")))
    return {"level": level, "text": text, "why": facts.get("why"), "fix": fix}


def live_context(st: dict[str, Any]) -> dict[str, Any]:
    """What the live templates need: rows, totals, headline."""
    rows = connected_rows(st)
    return {
        "rows": rows,
        "headline": headline(st.get("headline")),
        "rx_total": sum(int(r.get("rx_bytes") or 0) for r in rows),
        "tx_total": sum(int(r.get("tx_bytes") or 0) for r in rows),
        "now": time.time(),
    }


@bp.get("/part/live")
def live() -> tuple[str, int]:
    try:
        st = status()
    except AgentNotRunning as e:
        return render_template("live.html", down=True, headline=headline(agent_down(e.message))), 503
    back = "devices" if request.args.get("back") == "devices" else "dashboard"
    return render_template("live.html", down=False, back=back, **live_context(st)), 200


@bp.get("/api/traffic")
def traffic() -> Response | tuple[Response, int]:
    """The agent's traffic history (bytes per minute, oldest first), as it gives it."""
    minutes = request.args.get("minutes", "60")
    if not minutes.isdigit() or not 1 <= int(minutes) <= MAX_MINUTES:
        return jsonify(error=f"minutes must be 1-{MAX_MINUTES}, not {minutes!r}"), 400
    return jsonify(agent().get(f"/v1/traffic?minutes={int(minutes)}"))

"""JSON for the page's scripts: status (the traffic graph polls it), the sharing
toggles, logs. Same session and CSRF rules as the pages (header X-CSRF-Token)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, jsonify, request
from werkzeug.wrappers import Response

from webui.agent import agent, status
from webui.dashboard import sharing, sharing_change
from webui.setup import approve_own_routes

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__, url_prefix="/api")

# The status for scripts (the dashboard's own swaps HTML from /part/live).
STATUS_FIELDS = ("agent", "control", "self", "interface", "peers", "connected", "headline", "led",
                 "rx_bytes", "tx_bytes")  # fmt: skip


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


class BadRequest(Exception):
    pass


@bp.errorhandler(BadRequest)
def bad_request(e: BadRequest) -> tuple[Response, int]:
    return jsonify(error=str(e)), 400


@bp.get("/status")
def api_status() -> Response:
    st = status()
    out: dict[str, Any] = {k: st[k] for k in STATUS_FIELDS if k in st}
    out["share"] = sharing(st)
    out["time"] = time.time()
    return jsonify(out)


@bp.post("/share")
def api_share() -> Response:
    body = _json_body()
    field, on = body.get("field"), body.get("on")
    if not isinstance(field, str) or not isinstance(on, bool):
        raise BadRequest('give {"field": "exit_node" | "lan", "on": true | false}')
    st = status()
    try:
        changes = sharing_change(field, on, st)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    prefs = agent().patch("/v1/prefs", changes)
    log.info("prefs changed from the dashboard: %s", changes)
    approve_own_routes(st, changes)
    return jsonify(prefs=prefs)


@bp.patch("/prefs")
def api_prefs() -> Response:
    changes = _json_body()
    prefs = agent().patch("/v1/prefs", changes)
    log.info("prefs changed through the web API: %s", sorted(changes))
    return jsonify(prefs)


@bp.get("/logs")
def api_logs() -> Response:
    after = request.args.get("after", "0")
    if not after.isdigit():
        raise BadRequest("after must be a log sequence number")
    return jsonify(agent().get(f"/v1/logs?after={after}"))

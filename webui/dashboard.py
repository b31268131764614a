"""The dashboard: this node, what it shares, its peers and traffic; approvals; logs."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from webui.agent import agent, form_action, local_control, status, status_and_control_nodes
from webui.connected import live_context
from webui.setup import EXIT_ROUTES, approve_own_routes, lan_prefixes, route_order

log = logging.getLogger(__name__)
bp = Blueprint("dashboard", __name__)


def pending_routes(node: dict[str, Any]) -> list[str]:
    """Routes a node advertises that control has not approved yet."""
    approved = set(node.get("approved_routes") or [])
    return [r for r in node.get("advertised_routes") or [] if r not in approved]


def route_label(route: str) -> str:
    return "exit node" if route in EXIT_ROUTES else route


def approvals(nodes: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pending nodes, nodes with routes waiting), for the approval cards."""
    if not nodes:
        return [], []
    waiting = [n for n in nodes if n.get("state") == "pending"]
    routes = []
    for n in nodes:
        pending = pending_routes(n)
        labels = sorted({route_label(r) for r in pending})
        if pending:
            routes.append({"node": n, "routes": labels})
    return waiting, routes


def sharing(st: dict[str, Any]) -> dict[str, Any]:
    prefs = st.get("prefs") if isinstance(st.get("prefs"), dict) else {}
    assert isinstance(prefs, dict)
    return {
        "exit_node": bool(prefs.get("advertise_exit_node")),
        "lan": bool(prefs.get("advertise_routes")),
        "routes": list(prefs.get("advertise_routes") or []),
        "detected": lan_prefixes(st),
    }


@bp.get("/")
def index() -> str:
    st, nodes, control_error = status_and_control_nodes()
    waiting, routes = approvals(nodes)
    return render_template(
        "dashboard.html",
        st=st,
        **live_context(st),
        back="dashboard",
        share=sharing(st),
        local_control=local_control(st),
        waiting=waiting,
        route_requests=routes,
        control_error=control_error,
    )


def sharing_change(field: str, on: bool, st: dict[str, Any]) -> dict[str, Any]:
    """The prefs change one dashboard toggle stands for."""
    if field == "exit_node":
        return {"advertise_exit_node": on}
    if field == "lan":
        prefixes = lan_prefixes(st)
        if on and not prefixes:
            raise ValueError("no home LAN was detected to share; set advertise_routes with `meshpi set`")
        return {"advertise_routes": prefixes if on else []}
    raise ValueError(f"unknown toggle {field!r}")


@bp.post("/share")
@form_action("dashboard.index")
def share() -> Response:
    """The no-JavaScript path of the toggles (app.js sends the same to /api/share)."""
    field, on = request.form.get("field", ""), request.form.get("on") == "1"
    try:
        changes = sharing_change(field, on, status())
    except ValueError as e:
        flash(str(e), "error")
        return redirect(url_for("dashboard.index"))
    st = status()
    agent().patch("/v1/prefs", changes)
    log.info("prefs changed from the dashboard: %s", changes)
    approve_own_routes(st, changes)
    return redirect(url_for("dashboard.index"))


def _node(node_id: int) -> dict[str, Any] | None:
    for n in agent().get("/v1/control/nodes"):
        if isinstance(n, dict) and n.get("id") == node_id:
            return n
    return None


@bp.post("/nodes/<int:node_id>/approve")
@form_action("dashboard.index")
def approve_node(node_id: int) -> Response:
    node = agent().post(f"/v1/control/nodes/{node_id}/approve", {})
    log.info("approved node %s", node.get("name") if isinstance(node, dict) else node_id)
    flash(f"Approved {node.get('name') if isinstance(node, dict) else node_id}.", "ok")
    return redirect(url_for("dashboard.index"))


@bp.post("/nodes/<int:node_id>/routes")
@form_action("dashboard.index")
def approve_routes(node_id: int) -> Response:
    node = _node(node_id)
    if node is None:
        flash("That node is gone.", "error")
        return redirect(url_for("dashboard.index"))
    wanted = request.form.getlist("route")
    pending = pending_routes(node)
    chosen = [r for r in pending if route_label(r) in wanted]
    if not chosen:
        flash("Nothing to approve: that route was already approved or withdrawn.", "error")
        return redirect(url_for("dashboard.index"))
    approved = sorted(set(node.get("approved_routes") or []) | set(chosen), key=route_order)
    agent().post(f"/v1/control/nodes/{node_id}/routes", {"approved_routes": approved})
    log.info("approved routes %s of node %s", chosen, node.get("name"))
    flash(f"Approved {', '.join(sorted({route_label(r) for r in chosen}))} for {node.get('name')}.", "ok")
    return redirect(url_for("dashboard.index"))


@bp.get("/reach")
def reach() -> str:
    """`meshpi netcheck`, for a person: probes now (STUN from the WireGuard port, the
    router's port mapping) and says whether the internet can reach this Pi, and why."""
    from flask import current_app

    from appliance.client.localapi import LocalClient
    from webui.agent import LocalAPIError

    try:
        # A few STUN round trips and the router's answer: longer than a page's usual wait.
        report = LocalClient(current_app.config["LOCALAPI_SOCKET"], 30).get("/v1/netcheck")
        error = None
    except LocalAPIError as e:  # static mode (409), or the probe failed: said, not a 500
        if e.status == 503:
            raise
        report, error = {}, e.message
    return render_template("reach.html", r=report if isinstance(report, dict) else {}, error=error)


@bp.get("/logs")
def logs() -> str:
    doc = agent().get("/v1/logs")
    lines = [ln for ln in doc.get("lines", []) if isinstance(ln, dict)] if isinstance(doc, dict) else []
    last = max((ln.get("seq", 0) for ln in lines), default=0)
    return render_template("logs.html", lines=lines[::-1], last=last)  # newest first

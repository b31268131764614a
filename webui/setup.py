"""First run: the admin password, then a mesh (new or joined), then what to share.

The password step is the only page open without a login, and only while no
password exists; the later steps need the session it opens. It asks for the
one-time setup code (webui.setupcode), so that only the Pi's owner can take it, and
creates the password file exclusively, so that of two setups at once one wins and
the other is told so.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from webui.agent import LocalAPIError, agent, form_action, local_control, status
from webui.auth import remember_device
from webui.passwords import PasswordError, PasswordFile, PasswordTaken, check_new_password
from webui.security import LoginThrottle, already_set, client_key, log_in
from webui.setupcode import SetupCode

log = logging.getLogger(__name__)
bp = Blueprint("setup", __name__, url_prefix="/setup")

Answer = tuple[str, int, dict[str, str]]
EXIT_ROUTES = ("0.0.0.0/0", "::/0")
# Creating a mesh starts control (up to 30 s) and then logs in (up to 20 s).
VERB_TIMEOUT = 90.0


@bp.route("", methods=["GET", "POST"])
def password() -> Response | str | tuple[str, int] | Answer:
    passwords: PasswordFile = current_app.extensions["meshpi_passwords"]
    if passwords.is_set():
        return redirect(url_for("setup.mesh"))  # the gate let us in: logged in
    code: SetupCode = current_app.extensions["meshpi_setup_code"]
    st = _status_or_empty()
    ready = code.read() is not None

    def again(error: str, status: int, headers: dict[str, str] | None = None) -> Answer:
        page = render_template("setup_password.html", st=st, error=error, code_ready=ready)
        return page, status, headers or {}

    if request.method == "GET":
        return render_template("setup_password.html", st=st, error=None, code_ready=ready)
    throttle: LoginThrottle = current_app.extensions["meshpi_setup_throttle"]
    who = client_key(request.remote_addr)
    wait = throttle.retry_after(who)
    if wait:
        error = f"Too many wrong setup codes. Try again in {wait} seconds."
        return again(error, 429, {"Retry-After": str(wait)})
    if not code.check(request.form.get("setup_code", "")):
        throttle.failed(who)
        log.warning("first-run setup from %s refused: wrong setup code", request.remote_addr)
        return again("Not set: that is not this Pi's setup code.", 403)
    new, confirm = request.form.get("password", ""), request.form.get("confirm", "")
    try:
        check_new_password(new, confirm)
        passwords.create(new)
    except PasswordTaken:
        log.warning("first-run setup from %s lost: the password was set just before", request.remote_addr)
        return already_set()
    except PasswordError as e:
        return again(f"Not set: {e}.", 400)
    log.info("admin password set from %s", request.remote_addr)
    code.remove()
    stored = passwords.read()
    assert stored is not None
    log_in(stored)
    response = redirect(url_for("setup.mesh"))
    remember_device(response)
    return response


def _status_or_empty() -> dict[str, Any]:
    """The password step works even while the agent is down: it needs nothing from it."""
    try:
        return status()
    except LocalAPIError:
        return {}


def _connected(st: dict[str, Any]) -> bool:
    control = st.get("control")
    return isinstance(control, dict) and control.get("state") == "connected"


@bp.route("/mesh", methods=["GET", "POST"])
def mesh() -> Response | str | tuple[str, int]:
    st = status()
    if request.method == "GET":
        return render_template("setup_mesh.html", st=st, connected=_connected(st), result=None, form={})
    action = request.form.get("action")
    # What was typed stays in the form when the answer is no.
    typed = {k: request.form.get(k, "") for k in ("action", "public_url", "login_server", "auth_key")}
    if action == "create":
        body: dict[str, Any] = {}
        public_url = request.form.get("public_url", "").strip()
        if public_url:
            body["public_url"] = public_url
        call = ("/v1/mesh/create", body)
    elif action == "join":
        login_server = request.form.get("login_server", "").strip()
        auth_key = request.form.get("auth_key", "").strip() or None
        if not login_server:
            result = {"state": "error", "detail": "give the login URL of the mesh's control server"}
            return render_template("setup_mesh.html", st=st, connected=False, result=result, form=typed), 400
        call = ("/v1/up", {"login_server": login_server, "auth_key": auth_key})
    else:
        flash("Choose: create a new mesh, or join one.", "error")
        return redirect(url_for("setup.mesh"))
    try:
        result = agent().post(*call, timeout=VERB_TIMEOUT)
    except LocalAPIError as e:
        return render_template("setup_mesh.html", st=st, connected=False, result={"state": "error",
                               "detail": e.message}, form=typed), 400  # fmt: skip
    state = result.get("state") if isinstance(result, dict) else None
    log.info("setup: %s -> %s", action, state)
    if state == "connected":
        flash("This node is in the mesh.", "ok")
        return redirect(url_for("setup.share"))
    return render_template("setup_mesh.html", st=status(), connected=False, result=result, form=typed)


def route_order(route: str) -> tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    net = ipaddress.ip_network(route)
    return net.version, net


def approve_own_routes(st: dict[str, Any], changes: dict[str, Any]) -> None:
    """On a Pi that runs its mesh's control, what its owner just chose to share is
    approved with it: the owner is that control's admin, and a second "Approve" for
    their own Pi only surprises them. Control applies an approval only to routes the
    node advertises, so it may come before the prefs reach control."""
    me = st.get("self")
    key = me.get("public_key") if isinstance(me, dict) else None
    wanted = set(EXIT_ROUTES if changes.get("advertise_exit_node") else ())
    wanted |= {str(r) for r in changes.get("advertise_routes") or []}
    if not local_control(st) or not key or not wanted:
        return
    try:
        nodes = agent().get("/v1/control/nodes")
        for n in nodes if isinstance(nodes, list) else []:
            if isinstance(n, dict) and n.get("node_key") == key:
                approved = set(n.get("approved_routes") or [])
                if not wanted <= approved:
                    routes = sorted(approved | wanted, key=route_order)
                    agent().post(f"/v1/control/nodes/{n['id']}/routes", {"approved_routes": routes})
                    added = sorted(wanted - approved, key=route_order)
                    log.info("approved this node's own routes %s", added)
                return
    except LocalAPIError as e:  # the approvals card still offers it
        log.warning("could not approve this node's own routes %s: %s", sorted(wanted), e.message)


def lan_prefixes(st: dict[str, Any]) -> list[str]:
    """The home LAN the agent detected (status.lan.prefixes)."""
    lan = st.get("lan")
    prefixes = lan.get("prefixes") if isinstance(lan, dict) else None
    return [str(p) for p in prefixes] if isinstance(prefixes, list) else []


@bp.get("/share")
def share() -> str:
    st = status()
    return render_template("setup_share.html", st=st, prefixes=lan_prefixes(st))


@bp.post("/share")
@form_action("setup.share")
def share_save() -> Response:
    st = status()
    prefixes = lan_prefixes(st)
    chosen = [p for p in request.form.getlist("route") if p in prefixes]
    changes = {"advertise_exit_node": request.form.get("exit_node") == "on", "advertise_routes": chosen}
    agent().patch("/v1/prefs", changes)
    approve_own_routes(st, changes)
    log.info("setup: exit node %s, LAN routes %s", changes["advertise_exit_node"], chosen or "none")
    if local_control(st):
        flash("Saved. This Pi offers them to your mesh now.", "ok")
    else:
        flash("Saved. Routes this node offers carry traffic once the mesh's control approves them.", "ok")
    return redirect(url_for("dashboard.index"))

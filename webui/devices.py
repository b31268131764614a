"""Devices: phones with the stock WireGuard app, and laptops running meshpi.

A phone's config holds its private key. The agent makes it and returns it once, in
the answer to POST /v1/devices; this page renders that one answer (a QR code and a
`.conf` download built into the page as data: URIs) and keeps nothing: no file,
no session entry, no cache (responses are `no-store`).
"""

from __future__ import annotations

import base64
import logging
import re
import shlex
from typing import Any
from urllib.parse import quote

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from webui.agent import AgentNotRunning, LocalAPIError, agent, form_action, local_control, status
from webui.connected import live_context

log = logging.getLogger(__name__)
bp = Blueprint("devices", __name__, url_prefix="/devices")

MODES = {"all": "all traffic through home", "lan": "home LAN only"}
_FILE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


QR_BORDER = 4
# The smallest module a phone camera reads at arm's length, in CSS pixels: the page
# never draws the code smaller (style.css fills the card's width above that).
QR_MIN_MODULE = 4


def qr_data_uri(text: str) -> tuple[str, int]:
    """The config as a QR code: an SVG data: URI (no request leaves the page; a vector
    stays sharp at whatever width the screen gives it) and the smallest width in CSS
    pixels at which it still scans."""
    import segno  # here: only the devices page draws QR codes (the dashboard's RSS, issue 14)

    qr = segno.make(text, error="m", micro=False)
    width, _ = qr.symbol_size(scale=1, border=QR_BORDER)
    uri = qr.svg_data_uri(scale=1, border=QR_BORDER, dark="#000", light="#fff")
    return str(uri), int(width) * QR_MIN_MODULE


def conf_data_uri(text: str) -> str:
    return "data:text/plain;charset=utf-8;base64," + base64.b64encode(text.encode()).decode()


def conf_file_name(name: str) -> str:
    # The WireGuard apps name the tunnel after the file: keep it short and plain.
    return (_FILE_NAME.sub("-", name).strip("-.") or "meshpi")[:15] + ".conf"


def _devices() -> tuple[list[dict[str, Any]], str | None]:
    try:
        doc = agent().get("/v1/devices")
    except AgentNotRunning:
        raise
    except LocalAPIError as e:
        return [], e.message
    items = doc.get("devices", doc) if isinstance(doc, dict) else doc
    return ([d for d in items if isinstance(d, dict)] if isinstance(items, list) else []), None


def _prefs(st: dict[str, Any]) -> dict[str, Any]:
    prefs = st.get("prefs")
    return prefs if isinstance(prefs, dict) else {}


def phones_reach(st: dict[str, Any]) -> dict[str, Any]:
    """The agent's verdict on phones reaching this node from outside (status reach.phones)."""
    reach = st.get("reach")
    phones = reach.get("phones") if isinstance(reach, dict) else None
    return phones if isinstance(phones, dict) else {}


def default_endpoint(st: dict[str, Any]) -> str:
    """What the agent would put in a phone's config when none is typed: the phones'
    endpoint it found (the owner's name, the mapped port, a forward), else the first
    advertised endpoint; empty when phones cannot reach this node from outside."""
    phones = phones_reach(st)
    if phones.get("reachable") and phones.get("endpoint"):
        return str(phones["endpoint"])
    advertised = _prefs(st).get("advertise_endpoints")
    return str(advertised[0]) if isinstance(advertised, list) and advertised else ""


@bp.get("")
def index() -> str:
    st = status()
    _, error = _devices()
    return render_template("devices.html", st=st, **live_context(st), back="devices", devices_error=error,
                           modes=MODES, local_control=local_control(st), endpoint=default_endpoint(st),
                           phones=phones_reach(st),
                           listen_port=_prefs(st).get("listen_port", 51820))  # fmt: skip


@bp.post("")
@form_action("devices.index")
def add() -> Response | str:
    name = request.form.get("name", "").strip()
    mode = request.form.get("mode", "all")
    endpoint = request.form.get("endpoint", "").strip()
    if not name or mode not in MODES:
        flash("Give the device a name and choose what goes through home.", "error")
        return redirect(url_for("devices.index"))
    body: dict[str, Any] = {"name": name, "mode": mode}
    if endpoint:
        body["endpoint"] = endpoint
    answer = agent().post("/v1/devices", body)
    device = answer.get("device", {}) if isinstance(answer, dict) else {}
    config = answer.get("config", "") if isinstance(answer, dict) else ""
    if not isinstance(config, str) or not config:
        flash("The agent made the device but sent no config.", "error")
        return redirect(url_for("devices.index"))
    log.info("device %s added (%s)", device.get("name", name), mode)
    qr, qr_size = qr_data_uri(config)
    phones = answer.get("phones") if isinstance(answer, dict) else None
    return render_template(
        "device_new.html",
        device=device,
        phones=phones if isinstance(phones, dict) else {},
        mode=MODES[mode],
        config=config,
        qr=qr,
        qr_size=qr_size,
        download=conf_data_uri(config),
        file_name=conf_file_name(str(device.get("name", name))),
    )


@bp.post("/<device_id>/rename")
@form_action("devices.index")
def rename(device_id: str) -> Response:
    name = request.form.get("name", "").strip()
    if not name:
        flash("Give the device a name.", "error")
        return redirect(_back())
    agent().patch(f"/v1/devices/{quote(device_id, safe='')}", {"name": name})
    log.info("device %s renamed to %r", device_id, name)
    flash(f"Renamed to {name}.", "ok")
    return redirect(_back())


@bp.post("/<device_id>/enable")
@form_action("devices.index")
def enable(device_id: str) -> Response:
    on = request.form.get("enabled") == "1"
    agent().patch(f"/v1/devices/{quote(device_id, safe='')}", {"enabled": on})
    log.info("device %s %s", device_id, "enabled" if on else "disabled")
    said = "Enabled: its config works again." if on else "Disabled: its config stops working until enabled."
    flash(said, "ok")
    return redirect(_back())


def _back() -> str:
    """Back to the page the form was on (the dashboard or this one)."""
    return url_for("dashboard.index") if request.form.get("back") == "dashboard" else url_for("devices.index")


@bp.post("/<device_id>/revoke")
@form_action("devices.index")
def revoke(device_id: str) -> Response:
    agent().delete(f"/v1/devices/{quote(device_id, safe='')}")
    log.info("device %s revoked", device_id)
    flash("Device revoked: its key no longer works.", "ok")
    return redirect(_back())


def up_command(login_url: str, auth_key: str) -> str:
    return f"sudo meshpi up --login-server {shlex.quote(login_url)} --auth-key {shlex.quote(auth_key)}"


@bp.post("/laptop")
@form_action("devices.index")
def laptop() -> Response | str:
    st = status()
    lc = st.get("local_control") if isinstance(st.get("local_control"), dict) else None
    login_url = lc.get("login_url") if isinstance(lc, dict) else None
    if not local_control(st) or not isinstance(login_url, str):
        flash("This node does not run the mesh's control server: make the key where it runs "
              "(`meshpi-control keys create`).", "error")  # fmt: skip
        return redirect(url_for("devices.index"))
    key = agent().post("/v1/control/keys", {"reusable": False, "expires_in": 3600})
    secret = key.get("key") if isinstance(key, dict) else None
    if not isinstance(secret, str):
        flash("Control made no key.", "error")
        return redirect(url_for("devices.index"))
    log.info("single-use auth key %s made for a laptop", key.get("prefix"))
    return render_template(
        "laptop.html", command=up_command(login_url, secret), expires=key.get("expires_at")
    )

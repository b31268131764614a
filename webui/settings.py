"""Settings: the node's prefs that an owner changes by hand, and the admin password.

Only fields that changed are sent (PATCH /v1/prefs); the agent checks them and its
message for a bad value (`prefs: mtu: 99999 is out of range (1280-9000)`) is shown.
LED fields appear only when the agent's prefs have them.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response

from webui.agent import agent, form_action
from webui.passwords import PasswordError, PasswordFile, check_new_password
from webui.security import LoginThrottle, log_in

log = logging.getLogger(__name__)
bp = Blueprint("settings", __name__, url_prefix="/settings")

INT_FIELDS = ("mtu", "listen_port")
LED_FIELDS = ("led_pins", "act_led")


class FormError(ValueError):
    pass


def _int(field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FormError(f"{field}: {text!r} is not a number") from None


def _led_value(field: str, text: str, current: object) -> object:
    """LED prefs in the form the agent's prefs hold them: a list of GPIO pins, or a name."""
    text = text.strip()
    if isinstance(current, list) or field == "led_pins":
        return [_int(field, t.strip()) for t in text.replace(",", " ").split()]
    if isinstance(current, bool):
        return text == "on"
    return text or None


def prefs_changes(form: dict[str, str], prefs: dict[str, Any]) -> dict[str, Any]:
    """The prefs this form changes, each parsed to its JSON type."""
    wanted: dict[str, Any] = {}
    if "hostname" in form:
        wanted["hostname"] = form["hostname"].strip() or None
    if "advertise_endpoints" in form:
        wanted["advertise_endpoints"] = form["advertise_endpoints"].replace(",", " ").split()
    for field in INT_FIELDS:
        if field in form:
            wanted[field] = _int(field, form[field].strip())
    for field in LED_FIELDS:
        if field in prefs:
            wanted[field] = _led_value(field, form.get(field, ""), prefs[field])
    return {k: v for k, v in wanted.items() if prefs.get(k) != v}


def led_text(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "" if value is None or isinstance(value, bool) else str(value)


@bp.get("")
def index() -> str:
    prefs = agent().get("/v1/prefs")
    return render_template("settings.html", prefs=prefs, led_fields=[f for f in LED_FIELDS if f in prefs],
                           led_text=led_text)  # fmt: skip


@bp.post("")
@form_action("settings.index")
def save() -> Response:
    prefs = agent().get("/v1/prefs")
    try:
        changes = prefs_changes(request.form.to_dict(), prefs)
    except FormError as e:
        flash(f"Not saved: {e}.", "error")
        return redirect(url_for("settings.index"))
    if not changes:
        flash("Nothing changed.", "ok")
        return redirect(url_for("settings.index"))
    agent().patch("/v1/prefs", changes)
    log.info("settings changed: %s", ", ".join(sorted(changes)))
    flash(f"Saved: {', '.join(sorted(changes))}.", "ok")
    return redirect(url_for("settings.index"))


@bp.post("/password")
def password() -> Response:
    passwords: PasswordFile = current_app.extensions["meshpi_passwords"]
    throttle: LoginThrottle = current_app.extensions["meshpi_throttle"]
    address, form = request.remote_addr or "unknown", request.form
    try:
        if throttle.retry_after(address):
            raise PasswordError("too many wrong passwords; wait a few minutes")
        if not passwords.check(form.get("current", "")):
            throttle.failed(address)
            raise PasswordError("the current password is wrong")
        check_new_password(form.get("password", ""), form.get("confirm", ""))
        passwords.set(form.get("password", ""))
    except PasswordError as e:
        flash(f"Password not changed: {e}.", "error")
        return redirect(url_for("settings.index"))
    stored = passwords.read()
    assert stored is not None
    log_in(stored)  # every other session ends with the old password
    log.info("admin password changed from %s", request.remote_addr)
    flash("Password changed; other sessions are logged out.", "ok")
    return redirect(url_for("settings.index"))


@bp.post("/leave")
@form_action("settings.index")
def leave() -> Response:
    result = agent().post("/v1/logout", {})
    detail = result.get("detail") if isinstance(result, dict) else None
    log.info("left the mesh from the dashboard: %s", detail)
    flash(f"Left the mesh{': ' + detail if detail else ''}.", "ok")
    return redirect(url_for("setup.mesh"))

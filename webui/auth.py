"""Log in and out. Failed logins are throttled per address and overall (429 + Retry-After)."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from webui.passwords import PasswordError, PasswordFile
from webui.security import LoginThrottle, log_in

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never `//elsewhere` or `https://elsewhere`."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("dashboard.index")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str | tuple[str, int, dict[str, str]]:
    passwords: PasswordFile = current_app.extensions["meshpi_passwords"]
    if not passwords.is_set():
        return redirect(url_for("setup.password"))
    next_url = _safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", next=next_url, error=None)
    throttle: LoginThrottle = current_app.extensions["meshpi_throttle"]
    address = request.remote_addr or "unknown"
    wait = throttle.retry_after(address)
    if wait:
        log.warning("login from %s refused: too many failed attempts (retry in %d s)", address, wait)
        error = f"Too many failed logins. Try again in {wait} seconds."
        return render_template("login.html", next=next_url, error=error), 429, {"Retry-After": str(wait)}
    try:
        ok = passwords.check(request.form.get("password", ""))
    except PasswordError as e:
        return render_template("login.html", next=next_url, error=str(e)), 500, {}
    if not ok:
        throttle.failed(address)
        log.warning("failed login from %s", address)
        return render_template("login.html", next=next_url, error="Wrong password."), 401, {}
    throttle.succeeded(address)
    stored = passwords.read()
    assert stored is not None
    log_in(stored)
    log.info("login from %s", address)
    return redirect(next_url)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("auth.login"))

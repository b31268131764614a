"""Log in and out. Failed logins are throttled per address (IPv6: per /64) and overall
(429 + Retry-After); a browser with an open session or a remembered device is not held
by the overall limit."""

from __future__ import annotations

import logging
import re

from flask import Blueprint, current_app, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect
from werkzeug.wrappers import Response

from webui.passwords import PasswordError, PasswordFile
from webui.security import LoginThrottle, client_key, log_in, log_out, logged_in, sessions

log = logging.getLogger(__name__)
bp = Blueprint("auth", __name__)

DEVICE_COOKIE = "meshpi_device"
DEVICE_MAX_AGE = 365 * 86400
# A path of this site and a plain query: no control characters, no `\\`, no `//`, no
# percent-escapes that a browser would decode into one of those.
_NEXT = re.compile(r"/(?:[A-Za-z0-9_.-]+/?)*(?:\?[A-Za-z0-9_.=&-]*)?")
_NOT_NEXT = frozenset({"static", "auth.login", "auth.logout"})


def safe_next(target: str | None) -> str:
    """`next` if it is a page of this app (a GET route other than login), else `/`."""
    home = url_for("dashboard.index")
    if not target or not _NEXT.fullmatch(target) or "//" in target or "/../" in target:
        return home
    path = target.split("?", 1)[0]
    try:
        endpoint, _ = current_app.url_map.bind("localhost").match(path, method="GET")
    except (HTTPException, RequestRedirect):
        return home
    return target if endpoint not in _NOT_NEXT else home


def _trusted(passwords: PasswordFile) -> bool:
    return logged_in(passwords) or sessions().known_device(request.cookies.get(DEVICE_COOKIE))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str | tuple[str, int, dict[str, str]]:
    passwords: PasswordFile = current_app.extensions["meshpi_passwords"]
    if not passwords.is_set():
        return redirect(url_for("setup.password"))
    next_url = safe_next(request.values.get("next"))
    if request.method == "GET":
        return render_template("login.html", next=next_url, error=None)
    throttle: LoginThrottle = current_app.extensions["meshpi_throttle"]
    address = request.remote_addr or "unknown"
    who = client_key(address)
    wait = throttle.retry_after(who, trusted=_trusted(passwords))
    if wait:
        log.warning("login from %s refused: too many failed attempts (retry in %d s)", address, wait)
        error = f"Too many failed logins. Try again in {wait} seconds."
        return render_template("login.html", next=next_url, error=error), 429, {"Retry-After": str(wait)}
    try:
        ok = passwords.check(request.form.get("password", ""))
    except PasswordError as e:
        return render_template("login.html", next=next_url, error=str(e)), 500, {}
    if not ok:
        throttle.failed(who)
        log.warning("failed login from %s", address)
        return render_template("login.html", next=next_url, error="Wrong password."), 401, {}
    throttle.succeeded(who)
    stored = passwords.read()
    assert stored is not None
    log_in(stored)
    log.info("login from %s", address)
    response = redirect(next_url)
    remember_device(response)
    return response


def remember_device(response: Response) -> None:
    """The remembered-device cookie: it opens nothing, it only exempts this browser from
    the global login limit."""
    token = sessions().remember_device(request.cookies.get(DEVICE_COOKIE))
    response.set_cookie(DEVICE_COOKIE, token, max_age=DEVICE_MAX_AGE, httponly=True, samesite="Strict",
                        secure=bool(current_app.config["SESSION_COOKIE_SECURE"]))  # fmt: skip


@bp.post("/logout")
def logout() -> Response:
    log_out()
    return redirect(url_for("auth.login"))

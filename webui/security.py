"""Who may do what: sessions, CSRF tokens, the login throttle, response headers.

- Every page and API call needs a logged-in session, except the login page, static
  files, and the first setup step while no password exists yet. Until then every
  other page leads to /setup.
- Every state change (POST, PATCH, PUT, DELETE) carries the session's CSRF token,
  in the form field `csrf_token` or the `X-CSRF-Token` header.
- A session names the password it was opened with (a keyed digest of its hash), so
  `meshpi-web passwd` ends every open session; and its id must be open in the
  server-side SessionStore (webui.sessions), so logout ends it and it ends 12 h after
  the login however much it is used.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    g,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from webui.passwords import PasswordFile
from webui.sessions import SessionStore

UNSAFE_METHODS = frozenset({"POST", "PATCH", "PUT", "DELETE"})
OPEN_ENDPOINTS = frozenset({"static", "auth.login"})
FIRST_RUN_ENDPOINTS = frozenset({"setup.password", "static"})

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def password_tag(stored_hash: str) -> str:
    """What a session remembers of the password it was opened with."""
    key = current_app.secret_key
    assert isinstance(key, bytes | str)
    raw_key = key.encode() if isinstance(key, str) else key
    return hmac.new(raw_key, stored_hash.encode(), "sha256").hexdigest()[:32]


def sessions() -> SessionStore:
    store: SessionStore = current_app.extensions["meshpi_sessions"]
    return store


def log_in(stored_hash: str) -> None:
    old = session.get("sid")
    session.clear()  # a fresh session (and CSRF token) at every login
    sessions().close(old)
    session.permanent = True
    session["auth"] = password_tag(stored_hash)
    session["sid"] = sessions().open()
    csrf_token()


def log_out() -> None:
    sessions().close(session.get("sid"))
    session.clear()


def logged_in(passwords: PasswordFile) -> bool:
    tag, stored = session.get("auth"), passwords.read()
    return (
        isinstance(tag, str)
        and stored is not None
        and hmac.compare_digest(tag, password_tag(stored))
        and sessions().valid(session.get("sid"))
    )


def wants_json() -> bool:
    return request.path.startswith("/api/")


def _deny(status: int, message: str) -> BaseResponse:
    if wants_json():
        response = jsonify(error=message)
        response.status_code = status
        return response
    abort(status, description=message)


def _check_csrf() -> BaseResponse | None:
    if request.method not in UNSAFE_METHODS:
        return None
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        return _deny(403, "The form had expired or came from another site. Reload the page and try again.")
    return None


def already_set() -> tuple[str, int]:
    """A first-run password submitted after another browser's: the form cannot apply."""
    message = "Someone set the admin password a moment ago, from another browser. Log in with it."
    return render_template("error.html", title="Already set", status=409, message=message), 409


def gate() -> BaseResponse | None:
    """before_request: the first-run redirect, the login requirement, then CSRF."""
    endpoint = request.endpoint or ""
    passwords: PasswordFile = current_app.extensions["meshpi_passwords"]
    if endpoint == "static":
        return None
    if not passwords.is_set():
        if endpoint not in FIRST_RUN_ENDPOINTS:
            if wants_json():
                return _deny(401, "Set the admin password first, at /setup.")
            return redirect(url_for("setup.password"))
    elif endpoint not in OPEN_ENDPOINTS:
        g.logged_in = logged_in(passwords)
        if not g.logged_in:
            if wants_json():
                return _deny(401, "Log in first.")
            if endpoint == "setup.password":
                late = request.method == "POST"  # a first-run form that came late: told so
                return make_response(*already_set()) if late else redirect(url_for("auth.login"))
            target = request.full_path if request.method == "GET" else "/"
            return redirect(url_for("auth.login", next=target.rstrip("?")))
    return _check_csrf()


def secure_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
    return response


def init_app(app: Flask) -> None:
    app.before_request(gate)
    app.after_request(secure_headers)
    app.jinja_env.globals["csrf_token"] = csrf_token


# -- the login throttle ---------------------------------------------------------------


def client_key(address: str | None) -> str:
    """Whom the throttle counts: an IPv4 address, or an IPv6 /64 (one host owns a whole
    /64 and could otherwise try from 2^64 addresses)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass
class LoginThrottle:
    """Failed logins in a sliding window, per client address and in total.

    Past `per_address` failures from one address, or `overall` from everyone, logins
    are refused (HTTP 429) until the oldest failure leaves the window; a refused
    attempt does not even check the password. In memory: a restart forgets, which
    costs an attacker a restart per window and the owner nothing.
    """

    per_address: int = 5
    overall: int = 50
    window: float = 300.0
    clock: Callable[[], float] = time.monotonic
    _by_address: dict[str, deque[float]] = field(default_factory=dict)
    _all: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _expire(self, now: float) -> None:
        cutoff = now - self.window
        while self._all and self._all[0] <= cutoff:
            self._all.popleft()
        for address in list(self._by_address):
            times = self._by_address[address]
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self._by_address[address]

    def retry_after(self, address: str, trusted: bool = False) -> int:
        """Seconds until this address may try again; 0 when it may now. A trusted client
        (an open session, a remembered device) is not held by the global limit: failures
        from many addresses must not lock the owner out."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            waits = [0.0]
            times = self._by_address.get(address)
            if times is not None and len(times) >= self.per_address:
                waits.append(times[-self.per_address] + self.window - now)
            if not trusted and len(self._all) >= self.overall:
                waits.append(self._all[-self.overall] + self.window - now)
            return int(max(waits) + 0.999)

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            self._by_address.setdefault(address, deque()).append(now)
            self._all.append(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._by_address.pop(address, None)

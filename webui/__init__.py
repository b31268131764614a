"""meshpi-web: the LAN dashboard, a client of the agent's LocalAPI.

`create_app(config)` builds the Flask application; `meshpi-web serve` runs it with
waitress. The web service never touches the kernel and holds no key: it keeps only
its own session secret and the admin password's hash in its state directory.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from webui import errors, security
from webui.agent import Coalescer
from webui.hosts import HostCheck, HostGuard
from webui.passwords import PasswordFile
from webui.sessions import SessionStore
from webui.setupcode import FILE_NAME, SetupCode, show

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "LOCALAPI_SOCKET": "/run/meshpi/local.sock",
    "STATE_DIR": "/var/lib/meshpi-web",
    # Failed logins allowed within LOGIN_WINDOW seconds, per client address and overall.
    "LOGIN_FAILURES_PER_ADDRESS": 5,
    "LOGIN_FAILURES_OVERALL": 50,
    "LOGIN_WINDOW": 300,
    "PERMANENT_SESSION_LIFETIME": timedelta(hours=12),
    "SESSION_COOKIE_NAME": "meshpi_session",
    "SESSION_COOKIE_HTTPONLY": True,
    "SESSION_COOKIE_SAMESITE": "Strict",
    # The dashboard is plain HTTP on the LAN (no certificate a browser would trust).
    "SESSION_COOKIE_SECURE": False,
    "MAX_CONTENT_LENGTH": 64 * 1024,
    # Host names the dashboard answers to besides its own (<hostname>, <hostname>.local,
    # meshpi.local, localhost, its addresses): e.g. a name the owner gave it in their DNS.
    "ALLOWED_HOSTS": [],
    # The first-run setup code; None: <STATE_DIR>/setup-code.
    "SETUP_CODE_FILE": None,
    # Wrong setup codes allowed per client address within LOGIN_WINDOW.
    "SETUP_FAILURES_PER_ADDRESS": 10,
}


def load_secret_key(state_dir: Path) -> bytes:
    """The session-signing key, made once (0600) on first start and kept."""
    path = state_dir / "secret_key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    except ValueError:
        log.warning("%s was unreadable; made a new one (open sessions end)", path)
        path.unlink()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker made it first
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("made a new session key in %s", path)
    return key


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    if config:
        app.config.update(config)
    state_dir = Path(app.config["STATE_DIR"])
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = load_secret_key(state_dir)
    passwords = PasswordFile(state_dir)
    app.extensions["meshpi_passwords"] = passwords
    app.extensions["meshpi_sessions"] = SessionStore(
        state_dir, lifetime=app.config["PERMANENT_SESSION_LIFETIME"].total_seconds()
    )
    code = SetupCode(Path(app.config["SETUP_CODE_FILE"] or state_dir / FILE_NAME))
    app.extensions["meshpi_setup_code"] = code
    if not passwords.is_set():
        _open_setup(code)
    else:
        code.remove()  # a password set on the console (meshpi-web passwd) closed setup
    app.extensions["meshpi_status"] = Coalescer()
    app.extensions["meshpi_throttle"] = security.LoginThrottle(
        per_address=app.config["LOGIN_FAILURES_PER_ADDRESS"],
        overall=app.config["LOGIN_FAILURES_OVERALL"],
        window=float(app.config["LOGIN_WINDOW"]),
    )
    # The setup code has 60 bits: a per-address limit is enough, and a global one would
    # let anyone keep the owner from setting up.
    app.extensions["meshpi_setup_throttle"] = security.LoginThrottle(
        per_address=app.config["SETUP_FAILURES_PER_ADDRESS"],
        overall=1 << 62,
        window=float(app.config["LOGIN_WINDOW"]),
    )

    from webui import api, auth, connected, dashboard, devices, settings, setup, update
    from webui.format import init_app as init_filters

    for blueprint in (auth.bp, setup.bp, dashboard.bp, devices.bp, settings.bp, api.bp, connected.bp):
        app.register_blueprint(blueprint)
    update.init_app(app)
    security.init_app(app)
    errors.init_app(app)
    init_filters(app)
    # Outermost, so that it holds for every route, static files and 404s included.
    app.wsgi_app = HostGuard(app.wsgi_app, HostCheck(app.config["ALLOWED_HOSTS"]))  # type: ignore[method-assign]
    return app


def _open_setup(code: SetupCode) -> None:
    """No password yet: first-run setup needs the setup code. On the image root made it
    at boot (meshpi-setup-code.service); elsewhere the web service makes it, and says it
    in its log, which only the machine's admin can read."""
    try:
        value, made = code.ensure()
    except OSError as e:
        log.error("first-run setup is shut: cannot make a setup code in %s: %s", code.path, e)
        return
    if made:
        log.warning("first-run setup code: %s (also in %s; `sudo meshpi-web setup-code` prints it)",
                    show(value), code.path)  # fmt: skip
    else:
        log.info("first-run setup is open; its code is in %s (`sudo meshpi-web setup-code`)", code.path)

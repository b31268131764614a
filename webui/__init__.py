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
from webui.passwords import PasswordFile

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
    app.extensions["meshpi_passwords"] = PasswordFile(state_dir)
    app.extensions["meshpi_status"] = Coalescer()
    app.extensions["meshpi_throttle"] = security.LoginThrottle(
        per_address=app.config["LOGIN_FAILURES_PER_ADDRESS"],
        overall=app.config["LOGIN_FAILURES_OVERALL"],
        window=float(app.config["LOGIN_WINDOW"]),
    )

    from webui import api, auth, dashboard, devices, settings, setup
    from webui.format import init_app as init_filters

    for blueprint in (auth.bp, setup.bp, dashboard.bp, devices.bp, settings.bp, api.bp):
        app.register_blueprint(blueprint)
    security.init_app(app)
    errors.init_app(app)
    init_filters(app)
    return app

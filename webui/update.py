"""Updates on the dashboard: what runs, the last update's result, and uploading a
bundle (behind the login and CSRF, as every form).

The web process has no privileges and installs nothing. It checks an upload as
root will (signature against /etc/meshpi/update-keys, every wheel's hash, a version
newer than the one running), so the owner reads a refusal at once, and only then
leaves it in its own state directory (<state>/update/upload.bundle), where
meshpi-update.path starts root's meshpi-update.service to check it again and apply
it (appliance/update/spool.py). A downgrade is never allowed from here.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from flask import Blueprint, Flask, current_app, flash, redirect, render_template, request, url_for
from flask import Request as FlaskRequest
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from appliance.update.bundle import BundleError, Manifest, trusted_keys, verify_bundle
from appliance.update.install import Layout
from appliance.update.spool import MAX_UPLOAD
from appliance.update.state import CURRENT, KEYS, UPLOAD, VERSIONS
from webui.agent import agent, form_action, status

log = logging.getLogger(__name__)
bp = Blueprint("update", __name__, url_prefix="/update")

UPLOAD_PATH = "/update"
_CHUNK = 1024 * 1024


class Request(FlaskRequest):
    """The app's request: the upload may be a bundle's size; every other request keeps
    MAX_CONTENT_LENGTH (the limit is set before the CSRF check reads the form)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.method == "POST" and self.path == UPLOAD_PATH:
            self.max_content_length = MAX_UPLOAD

    def _load_form_data(self) -> None:
        try:
            super()._load_form_data()
        except RequestEntityTooLarge:
            if self.path != UPLOAD_PATH:
                raise
            raise RequestEntityTooLarge(
                f"Update refused: a bundle is at most {MAX_UPLOAD // (1024 * 1024)} MB; "
                "this upload is bigger. Nothing was changed."
            ) from None


def init_app(app: Flask) -> None:
    app.request_class = Request
    app.register_blueprint(bp)
    app.jinja_env.globals["recent_rollback"] = recent_rollback


def recent_rollback(up: dict[str, Any]) -> bool:
    """A rollback in the last day: worth a banner on every page until the owner has seen it."""
    last = up.get("last") or {}
    when = last.get("time")
    recent = isinstance(when, int | float) and time.time() - when < 86400
    return last.get("result") == "rolled back" and recent


def _spool() -> Path:
    return Path(current_app.config.get("UPDATE_SPOOL") or Path(current_app.config["STATE_DIR"]) / "update")


def _layout() -> Layout:
    return Layout(Path(current_app.config.get("UPDATE_VERSIONS") or VERSIONS),
                  Path(current_app.config.get("UPDATE_CURRENT") or CURRENT))  # fmt: skip


@bp.get("")
def index() -> str:
    st = status()
    waiting = (_spool() / UPLOAD).exists()
    url = (st.get("prefs") or {}).get("update_url") or ""
    return render_template("update.html", st=st, up=st.get("update") or {}, waiting=waiting, url=url)


@bp.post("")
def upload() -> Response:
    spool = _spool()
    if (spool / UPLOAD).exists():
        flash("An update is already waiting to be installed; wait for its result.", "error")
        return redirect(url_for("update.index"))
    given = request.files.get("bundle")
    if given is None or not given.filename:
        flash("Choose a bundle file (meshpi-VERSION.bundle) first.", "error")
        return redirect(url_for("update.index"))
    spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = spool / f".upload-{secrets.token_hex(8)}.part"
    try:
        manifest = _check(given.stream, part)
    except BundleError as e:
        part.unlink(missing_ok=True)
        log.warning("update upload from %s refused: %s", request.remote_addr, e.message)
        flash(f"{e.message[:1].upper()}{e.message[1:]}. Nothing was changed.", "error")
        return redirect(url_for("update.index"))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, spool / UPLOAD)  # the name meshpi-update.path waits for: complete or absent
    log.info("update upload from %s: meshpi %s checked, handed to meshpi-update.service",
             request.remote_addr, manifest.version)  # fmt: skip
    flash(f"meshpi {manifest.version}: signature and {len(manifest.files)} wheels checked. Installing now; "
          "the dashboard restarts in a few minutes, then this page shows the result.", "ok")  # fmt: skip
    return redirect(url_for("update.index"))


@bp.post("/url")
@form_action("update.index")
def url() -> Response:
    """The update URL (prefs update_url): root's daily check fetches from it; empty: off."""
    wanted = request.form.get("update_url", "").strip() or None
    agent().patch("/v1/prefs", {"update_url": wanted})
    log.info("update URL %s from %s", f"set to {wanted}" if wanted else "cleared", request.remote_addr)
    flash(f"Update URL saved: {wanted}. This Pi looks there once a night." if wanted
          else "Update URL cleared: updates only by upload.", "ok")  # fmt: skip
    return redirect(url_for("update.index"))


def _check(stream: IO[bytes], part: Path) -> Manifest:
    """Copy the upload to `part` (at most MAX_UPLOAD bytes) and check it as root will."""
    size = 0
    with part.open("xb") as out:
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > MAX_UPLOAD:
                raise BundleError(f"update refused: a bundle is at most {MAX_UPLOAD} bytes")
            out.write(chunk)
    keys = trusted_keys(Path(current_app.config.get("UPDATE_KEYS") or KEYS))
    installed = _layout().running_version()
    with tempfile.TemporaryDirectory(prefix="meshpi-update-check-") as tmp, part.open("rb") as f:
        return verify_bundle(f, keys, Path(tmp) / "wheels", installed)

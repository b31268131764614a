"""The server's own secrets, each in a 0600 file of its state directory.

- control.key   the X25519 key nodes pin (its public half is in the login URL)
- admin.token   the bearer token of the admin API
Made on first start; never overwritten, so the login URL stays valid.
"""

from __future__ import annotations

import base64
import logging
import secrets
from pathlib import Path

from nacl.public import PrivateKey

from appliance.base.files import atomic_write

log = logging.getLogger(__name__)


class ControlKeyError(Exception):
    pass


def _secret_file(path: Path, make: bytes) -> bytes:
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, make + b"\n", mode=0o600)
        log.info("made %s", path)
        return make
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return data


def load_control_key(state_dir: Path) -> PrivateKey:
    path = state_dir / "control.key"
    fresh = base64.b64encode(bytes(PrivateKey.generate()))
    text = _secret_file(path, fresh)
    try:
        raw = base64.b64decode(text, validate=True)
        return PrivateKey(raw)
    except (ValueError, TypeError) as e:
        raise ControlKeyError(
            f"{path}: not an X25519 private key ({e}); move it away to make a new one "
            "(every node will then need the new login URL)"
        ) from None


def read_admin_token(state_dir: Path) -> str:
    path = state_dir / "admin.token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ControlKeyError(
            f"{path} does not exist: start the server once (meshpi-control serve) to make it"
        ) from None
    except PermissionError:
        raise ControlKeyError(f"{path}: permission denied (the admin token is root's)") from None


def load_admin_token(state_dir: Path) -> str:
    return _secret_file(state_dir / "admin.token", secrets.token_urlsafe(32).encode()).decode()

"""Server-side session state: which logins are open, and which devices are remembered.

The session cookie is signed by Flask, but a signed cookie alone cannot be taken
back: logout would only ask the browser to forget it, and a copied cookie (the
dashboard is plain HTTP on the LAN) could be refreshed for ever. So each login gets
a random id that lives here; a request counts as logged in only while its id is
here and younger than LIFETIME since the login (an absolute limit that using the
session does not extend). Logout removes the id.

A remembered device is a random token (its own cookie) given at login. It grants
nothing by itself; it exempts its holder from the login throttle's global limit, so
failures from many addresses cannot lock out the owner's own browser.

Both are kept as SHA-256 digests (a copy of the file lets nobody in) in one small
JSON file of the web state directory, rewritten atomically at login and logout only.
Times are the wall clock, the only one that survives a restart; a login that seems
to come from the future (the clock was set back) is treated as expired.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from appliance.base.files import atomic_write

log = logging.getLogger(__name__)

LIFETIME = 12 * 3600.0
DEVICE_LIFETIME = 365 * 86400.0
MAX_SESSIONS = 64
MAX_DEVICES = 32
CLOCK_SLACK = 300.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """<state dir>/sessions.json: {"sessions": {digest: login time}, "devices": {digest: time}}."""

    def __init__(
        self, state_dir: Path, lifetime: float = LIFETIME, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = state_dir / "sessions.json"
        self.lifetime = lifetime
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, float] = {}
        self._devices: dict[str, float] = {}
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self.path.read_text())
            sessions, devices = doc["sessions"], doc["devices"]
            self._sessions = {str(k): float(v) for k, v in sessions.items()}
            self._devices = {str(k): float(v) for k, v in devices.items()}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Safe fallback: everyone logs in again.
            log.warning("%s is unreadable (%s): every session ends", self.path, e)

    def _save(self) -> None:
        doc = {"sessions": self._sessions, "devices": self._devices}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(doc, indent=1) + "\n", mode=0o600)

    def _fresh(self, started: float, lifetime: float, now: float) -> bool:
        return started - CLOCK_SLACK <= now < started + lifetime

    @staticmethod
    def _trim(table: dict[str, float], limit: int) -> None:
        for key in sorted(table, key=table.__getitem__)[: max(0, len(table) - limit)]:
            del table[key]

    def open(self) -> str:
        """A new session id (for the cookie); valid for `lifetime` from now."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = self._clock()
            self._sessions = {k: t for k, t in self._sessions.items() if self._fresh(t, self.lifetime, now)}
            self._sessions[_digest(sid)] = now
            self._trim(self._sessions, MAX_SESSIONS)
            self._save()
        return sid

    def valid(self, sid: object) -> bool:
        if not isinstance(sid, str) or not sid:
            return False
        with self._lock:
            started = self._sessions.get(_digest(sid))
            return started is not None and self._fresh(started, self.lifetime, self._clock())

    def close(self, sid: object) -> None:
        if not isinstance(sid, str):
            return
        with self._lock:
            if self._sessions.pop(_digest(sid), None) is not None:
                self._save()

    def close_all(self) -> None:
        with self._lock:
            self._sessions.clear()
            self._save()

    def remember_device(self, token: object = None) -> str:
        """A device token (new, or the one given, re-dated) for the remembered-device cookie."""
        with self._lock:
            now = self._clock()
            if not (isinstance(token, str) and _digest(token) in self._devices):
                token = secrets.token_urlsafe(32)
            self._devices[_digest(token)] = now
            self._devices = {k: t for k, t in self._devices.items() if self._fresh(t, DEVICE_LIFETIME, now)}
            self._trim(self._devices, MAX_DEVICES)
            self._save()
        return token

    def known_device(self, token: object) -> bool:
        if not isinstance(token, str) or not token:
            return False
        with self._lock:
            seen = self._devices.get(_digest(token))
            return seen is not None and self._fresh(seen, DEVICE_LIFETIME, self._clock())

"""The control server on this very node (a Pi that created its own mesh).

The agent starts it (`--control-start`, by default through systemd), finds its
control key and admin token in its state directory (control.key, admin.token:
see appliance/control/keys.py), and talks to its admin API over HTTP with that
token: to make the pre-auth key this node logs in with, and for the web UI,
whose `/v1/control/...` calls are passed on here.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.base.defaults import DEFAULT_CONTROL_START, DEFAULT_CONTROL_STATE, DEFAULT_CONTROL_URL
from appliance.base.errors import MeshpiError
from appliance.base.files import atomic_write
from appliance.base.net import Endpoint
from appliance.control.autoapprove import AUTO_APPROVE
from appliance.wire.loginurl import login_url
from appliance.wire.seal import ControlPublicKey

log = logging.getLogger(__name__)

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"  # control's admin API listens on loopback only
START_WAIT = 30.0
MAX_ANSWER = 8 << 20


class LocalControlError(MeshpiError):
    """Says what went wrong with the local control; `status` is the LocalAPI's answer."""


@dataclass(frozen=True)
class LocalControlOptions:
    state_dir: Path = DEFAULT_CONTROL_STATE
    start: str = DEFAULT_CONTROL_START
    url: str = DEFAULT_CONTROL_URL


def check_url(url: str, what: str, path: bool = False) -> str:
    """`url` if it is http(s)://host[:port] (and /path when `path`); else ValueError."""
    parts = urlsplit(url)
    shape = "http(s)://host[:port][/path]" if path else "http(s)://host[:port]"
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or (not path and parts.path not in ("", "/"))):  # fmt: skip
        raise ValueError(f"{what} {url!r} is not {shape}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"{what} {url!r}: {e}") from None
    return url.rstrip("/")


def _loopback(host: str) -> bool:
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class LocalControl:
    def __init__(self, options: LocalControlOptions, agent_state_dir: Path) -> None:
        self.options = options
        self.url = check_url(options.url, "--control-url")
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        # What this node remembers about the mesh it created (the URL others use).
        self._record = agent_state_dir / "local-control.json"
        # Control's port as the internet reaches it (reach/control_map.py), when mapped.
        self.public_endpoint: Callable[[], Endpoint | None] = lambda: None

    def wait_public(self, timeout: float) -> None:
        """A moment for the router to map control's port (create-mesh prints the URL once)."""
        deadline = time.monotonic() + timeout
        while self.public_endpoint() is None and time.monotonic() < deadline:
            time.sleep(0.1)

    def port_here(self) -> int | None:
        """Control's TCP port, while control's state is on this node and it listens here."""
        if not _loopback(self._host) or not (self.options.state_dir / "control.key").exists():
            return None
        return self._port

    # -- what is there ----------------------------------------------------------

    def token(self) -> str:
        path = self.options.state_dir / "admin.token"
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            raise LocalControlError(409, "control is not local") from None
        except OSError as e:
            raise LocalControlError(409, f"control is not local: {path}: {e.strerror}") from None
        if not token:
            raise LocalControlError(409, f"control is not local: {path} is empty")
        return token

    def public_key(self) -> ControlPublicKey | None:
        """Control's public key, from its control.key (never made here: that is control's job)."""
        try:
            raw = base64.b64decode(
                (self.options.state_dir / "control.key").read_bytes().strip(), validate=True
            )
            from nacl.public import PrivateKey

            return ControlPublicKey(bytes(PrivateKey(raw).public_key))
        except (OSError, ValueError, TypeError):
            return None

    def running(self) -> bool:
        """Does a meshpi control answer at the URL? (Its index page says so.)"""
        conn_type = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_type(self._host, self._port, timeout=0.5)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read(64).startswith(b"meshpi control")
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def status(self, lan: dict[str, Any] | None) -> dict[str, Any]:
        pub = self.public_key()
        if pub is None:  # no control state here: nothing to ask
            return {"running": False, "login_url": None}
        return {"running": self.running(), "login_url": login_url(self.shared_url(lan), pub)}

    def shared_url(self, lan: dict[str, Any] | None) -> str:
        """The URL other nodes use: the one given at create, else the public address
        of control's mapped port, else this node's LAN address on control's port,
        else control's own URL."""
        try:
            public = json.loads(self._record.read_text()).get("public_url")
        except (OSError, ValueError, AttributeError):
            public = None
        if isinstance(public, str) and public:
            return public
        mapped = self.public_endpoint()
        if mapped is not None:
            return f"{'https' if self._https else 'http'}://{mapped}"
        address = lan.get("address") if lan else None
        if address and _loopback(self._host):
            host = f"[{address}]" if ":" in address else address
            return f"{'https' if self._https else 'http'}://{host}:{self._port}"
        return self.url

    # -- making a mesh ------------------------------------------------------------

    def start(self) -> None:
        """Run the start command, then wait until the admin API answers with the token."""
        argv = shlex.split(self.options.start)
        if argv:
            log.info("starting the local control: %s", self.options.start)
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=START_WAIT)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise LocalControlError(
                    502, f"control start command {self.options.start!r} failed: {e}"
                ) from None
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip()[-300:]
                raise LocalControlError(
                    502, f"control start command {self.options.start!r} exited {done.returncode}: {why}"
                )
        deadline = time.monotonic() + START_WAIT
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                self.admin("GET", "keys")
                return
            except LocalControlError as e:
                last = e.message
            time.sleep(0.2)
        raise LocalControlError(504, f"the local control did not answer within {START_WAIT:g} s: {last}")

    def remember(self, public_url: str | None) -> None:
        atomic_write(self._record, json.dumps({"public_url": public_url}) + "\n")

    def new_auth_key(self) -> str:
        # This node is the owner's own: its advertised routes need no approval (autoapprove.py).
        body = {"reusable": False, "expires_in": 600, "tags": [AUTO_APPROVE]}
        status, answer = self.admin("POST", "keys", body)
        if status != 201 or not isinstance(answer, dict) or not isinstance(answer.get("key"), str):
            raise LocalControlError(502, f"control did not make a pre-auth key: {status} {answer}")
        return str(answer["key"])

    def own_login_url(self) -> str:
        pub = self.public_key()
        if pub is None:
            raise LocalControlError(502, f"{self.options.state_dir / 'control.key'} is missing or unreadable")
        return login_url(self.url, pub)

    # -- the admin API --------------------------------------------------------------

    def admin(self, method: str, path: str, body: object = None, query: str = "") -> tuple[int, Any]:
        """One admin call (`path` below /admin/v1/); returns (HTTP status, parsed answer)."""
        token = self.token()
        try:  # control writes where its admin listener is beside the token
            admin_url = (self.options.state_dir / "admin.url").read_text().strip() or DEFAULT_ADMIN_URL
        except OSError:
            admin_url = DEFAULT_ADMIN_URL
        admin = urlsplit(admin_url)
        conn = http.client.HTTPConnection(admin.hostname or "127.0.0.1", admin.port or 8081, timeout=30)
        target = f"/admin/v1/{path}" + (f"?{query}" if query else "")
        headers = {"Authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER)
        except (OSError, http.client.HTTPException) as e:
            raise LocalControlError(502, f"the local control does not answer at {admin_url}: {e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = {"error": raw.decode(errors="replace")[:300]}
        return response.status, answer

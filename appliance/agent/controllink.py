"""The agent's link to control: register, say what this node offers, and keep
`<state>/netmap.json` in step with the mesh by long-polling.

It runs in a thread of its own and touches no kernel state: it only writes the
netmap file, which the reconcile loop already watches. So a control outage
changes nothing on the data plane (the last netmap stays), and a restart without
control comes up from the last netmap on disk.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.agent.control_client import (
    ControlClient,
    ControlRefused,
    ControlUnreachable,
    pin_control_key,
)
from appliance.agent.files import atomic_write
from appliance.agent.statedir import StateDir
from appliance.core.keys import PrivateKey
from appliance.core.prefs import Prefs
from appliance.wire.fields import ConfigError, load_json
from appliance.wire.mapdelta import apply_delta, netmap_json
from appliance.wire.netmap import Netmap, parse_netmap
from appliance.wire.seal import parse_login_url

log = logging.getLogger(__name__)

MAP_TIMEOUT = 70.0  # the server answers within 50 s, keepalive or not
PENDING_RETRY = 5.0


class Backoff:
    """Exponential, capped, with full jitter: a thousand nodes that lost control
    together do not come back together."""

    def __init__(self, low: float = 0.5, high: float = 4.0) -> None:
        self.low, self.high, self.attempt = low, high, 0

    def next(self) -> float:
        ceiling = min(self.high, self.low * 2**self.attempt)
        self.attempt += 1
        return random.uniform(self.low, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True)
class Login:
    server: str
    auth_key: str | None

    @classmethod
    def load(cls, path: Path) -> Login | None:
        if not path.exists():
            return None
        doc = load_json(path)
        return cls(str(doc["server"]), doc.get("auth_key"))


class ControlLink(threading.Thread):
    def __init__(
        self,
        state: StateDir,
        node_key: PrivateKey,
        prefs: Callable[[], Prefs],
        offers: Callable[[Prefs], dict[str, Any]],
        netmap_path: Path,
    ) -> None:
        super().__init__(name="meshpi-control-link", daemon=True)
        self.state, self.node_key, self.prefs, self.offers = state, node_key, prefs, offers
        self.netmap_path = netmap_path
        self.login_path = state.path / "login.json"
        self.status_path = state.path / "control-status.json"
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._client: ControlClient | None = None

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def login_changed(self) -> None:
        self.wake.set()

    def offers_changed(self) -> None:
        """Prefs changed: tell control now, not after the current long-poll."""
        client = self._client
        if client is None:
            return
        prefs = self.prefs()

        def send() -> None:
            try:
                client.call("update", self.offers(prefs))
            except (ControlUnreachable, ControlRefused) as e:
                log.warning("could not tell control about new prefs: %s", e)

        threading.Thread(target=send, name="meshpi-control-update", daemon=True).start()

    def _status(self, state: str, detail: str = "", **extra: Any) -> None:
        doc = {"state": state, "detail": detail, **extra}
        atomic_write(self.status_path, json.dumps(doc) + "\n")

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                login = Login.load(self.login_path)
                if login is None:
                    self._status("needs-login", "run: meshpi up --login-server URL")
                    self.wake.wait()
                    self.wake.clear()
                    continue
                self._serve(login, backoff)
            except ControlUnreachable as e:
                self._status("unreachable", str(e))
                log.warning("control unreachable: %s", e)
            except (ControlRefused, ConfigError, ValueError, KeyError) as e:
                self._status("error", str(e))
                log.error("control: %s", e)
            self.wake.wait(backoff.next())
            self.wake.clear()

    def _serve(self, login: Login, backoff: Backoff) -> None:
        base, control_pub = parse_login_url(login.server)
        pin_control_key(self.state.path, base, control_pub)
        client = ControlClient(base, self.state.machine_key(), control_pub, timeout=MAP_TIMEOUT)
        prefs = self.prefs()
        hostname = prefs.hostname or _hostname()
        body = {"node_key": str(self.node_key.public_key()), "hostname": hostname,
                "auth_key": login.auth_key}  # fmt: skip
        reg = client.call("register", body)
        if login.auth_key is not None:
            # Used once; keep no secret on disk that is no longer needed.
            atomic_write(self.login_path, json.dumps({"server": login.server}) + "\n", mode=0o600)
        if reg["state"] != "approved":
            self._status("pending", "waiting for an admin to approve this node", name=reg["name"])
            self.wake.wait(PENDING_RETRY)
            return
        self._client = client
        client.call("update", self.offers(prefs))
        self._status("connected", f"logged in as {reg['name']}", name=reg["name"],
                     addresses=reg["addresses"], server=base)  # fmt: skip
        log.info("connected to control at %s as %s", base, reg["name"])
        backoff.reset()
        netmap: Netmap | None = None
        version: int | None = None
        while not self.stopping.is_set():
            answer = client.call("map", {"version": version}, timeout=MAP_TIMEOUT)
            if "full" in answer:
                netmap = parse_netmap(answer["full"], "control (full map)")
            elif "delta" in answer and netmap is not None:
                netmap = apply_delta(netmap, answer["delta"], "control (delta)")
            elif "keepalive" not in answer:
                raise ValueError(f"control sent a map answer with neither map nor delta: {sorted(answer)}")
            version = int(answer["version"])
            if netmap is not None and "keepalive" not in answer:
                atomic_write(self.netmap_path, json.dumps(netmap_json(netmap)) + "\n")


def _hostname() -> str:
    import socket

    return socket.gethostname()

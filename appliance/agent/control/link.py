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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.agent.control.client import (
    ControlClient,
    ControlRefused,
    ControlUnreachable,
    pin_control_key,
)
from appliance.agent.statedir import StateDir
from appliance.base.files import atomic_write
from appliance.base.keys import PrivateKey, PublicKey
from appliance.core.prefs import Prefs
from appliance.wire.fields import ConfigError, load_json
from appliance.wire.mapdelta import apply_delta, netmap_json
from appliance.wire.netmap import Netmap, parse_netmap
from appliance.wire.seal import parse_login_url

log = logging.getLogger(__name__)

MAP_TIMEOUT = 70.0  # the server answers within 50 s, keepalive or not
PENDING_RETRY = 5.0
DEVICE_TIMEOUT = 15.0


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
        prefs: Callable[[], Prefs],
        offers: Callable[[Prefs], dict[str, Any]],
        netmap_path: Path,
    ) -> None:
        super().__init__(name="meshpi-control-link", daemon=True)
        self.state, self.prefs, self.offers = state, prefs, offers
        self.netmap_path = netmap_path
        self.login_path = state.path / "login.json"
        self.status_path = state.path / "control-status.json"
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._client: ControlClient | None = None
        self._hostname = ""
        # A rotation (from the link's thread or a caller's) and a reconnect's
        # register never interleave, or control could be told the old key last.
        self._register_lock = threading.Lock()
        self._netmap_lock = threading.Lock()
        self._netmap: Netmap | None = None

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

    def rotate_key(self) -> PublicKey:
        """Move to a new node key now (any thread). Raises ControlError when there
        is no connection to announce it on."""
        client = self._client
        if client is None:
            raise ControlUnreachable("not connected to control: the key can only rotate through it")
        with self._register_lock:
            return self._rotate(client)

    def device(self, body: dict[str, Any]) -> dict[str, Any]:
        """Op `device` (host a phone, or stop): any thread, needs a connection."""
        client = self._client
        if client is None:
            raise ControlUnreachable("not connected to control")
        return client.call("device", body, timeout=DEVICE_TIMEOUT)

    def _register(self, client: ControlClient, key: PrivateKey, auth_key: str | None) -> dict[str, Any]:
        body = {"node_key": str(key.public_key()), "hostname": self._hostname, "auth_key": auth_key}
        answer: dict[str, Any] = client.call("register", body)
        return answer

    def _rotate(self, client: ControlClient) -> PublicKey:
        """Announce the next key with the machine key, then switch to it at once,
        before control's broadcast reaches the peers (see PROTOCOL.md, Rotation)."""
        old, new = self.state.node_key().public_key(), self.state.next_node_key()
        self._register(client, new, None)
        self.state.commit_node_key()
        with self._netmap_lock:
            if self._netmap is not None:
                me = replace(self._netmap.self_node, public_key=new.public_key())
                self._write_netmap(replace(self._netmap, self_node=me))
        log.info("rotated the node key from %s to %s", old, new.public_key())
        return new.public_key()

    def _write_netmap(self, netmap: Netmap) -> None:
        self._netmap = netmap
        atomic_write(self.netmap_path, json.dumps(netmap_json(netmap)) + "\n")

    def _serve(self, login: Login, backoff: Backoff) -> None:
        base, control_pub = parse_login_url(login.server)
        pin_control_key(self.state.path, base, control_pub)
        prefs = self.prefs()
        client = ControlClient(base, self.state.machine_key(), control_pub, MAP_TIMEOUT, prefs.fwmark)
        self._hostname = prefs.hostname or _hostname()
        with self._register_lock:
            # A rotation cut short resumes with its key, never the old one again.
            pending = self.state.rotation_pending()
            key = self.state.next_node_key() if pending else self.state.node_key()
            reg = self._register(client, key, login.auth_key)
            if pending:
                self.state.commit_node_key()
                log.info("finished rotating the node key to %s", key.public_key())
            if login.auth_key is not None:
                # Used once; keep no secret on disk that is no longer needed.
                atomic_write(self.login_path, json.dumps({"server": login.server}) + "\n", mode=0o600)
            if reg["state"] != "approved":
                self._status("pending", "waiting for an admin to approve this node", name=reg["name"])
                self.wake.wait(PENDING_RETRY)
                return
            if reg.get("key_expired"):
                log.info("control says the node key has expired: rotating it")
                self._rotate(client)
        self._client = client
        client.call("update", self.offers(prefs))
        self._status("connected", f"logged in as {reg['name']}", name=reg["name"],
                     addresses=reg["addresses"], server=base)  # fmt: skip
        log.info("connected to control at %s as %s", base, reg["name"])
        backoff.reset()
        version: int | None = None
        with self._netmap_lock:
            self._netmap = None
        while not self.stopping.is_set():
            answer = client.call("map", {"version": version}, timeout=MAP_TIMEOUT)
            version = int(answer["version"])
            if "keepalive" in answer:
                continue
            with self._netmap_lock:
                if "full" in answer:
                    netmap = parse_netmap(answer["full"], "control (full map)")
                elif "delta" in answer and self._netmap is not None:
                    netmap = apply_delta(self._netmap, answer["delta"], "control (delta)")
                else:
                    raise ValueError(f"control sent a map answer without a map or delta: {sorted(answer)}")
                self._write_netmap(netmap)


def _hostname() -> str:
    import socket

    return socket.gethostname()

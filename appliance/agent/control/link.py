"""The agent's link to control: register, say what this node offers, and keep the
loop's netmap in step with the mesh by long-polling.

It runs in a thread of its own and touches no kernel state: each answer is
parsed once (a delta costs what it holds, O(change)) and handed to the loop as
a typed update on the bus (bus.py). A control outage changes nothing on the
data plane (the loop keeps the last netmap), and a restart without control
comes up from the loop's snapshot (netmap.json).

Its status (connecting, connected, pending, …) lives in memory: `status` is an
immutable value replaced on each change, and `wait_for` lets `meshpi up` wait
for control's answer without polling a file.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.agent.bus import Bus, KeyRotated, NetmapDelta, NetmapFull
from appliance.agent.control.client import (
    ControlClient,
    ControlRefused,
    ControlUnreachable,
    pin_control_key,
)
from appliance.agent.statedir import StateDir
from appliance.base.files import atomic_write
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.core.prefs import Prefs
from appliance.wire.fields import ConfigError, load_json
from appliance.wire.loginurl import parse_login_url
from appliance.wire.mapdelta import parse_delta
from appliance.wire.netmap import CAPVER, Mesh, parse_netmap

log = logging.getLogger(__name__)

MAP_TIMEOUT = 70.0  # the server answers within 50 s, keepalive or not
PENDING_RETRY = 5.0
DEVICE_TIMEOUT = 15.0


@dataclass(frozen=True)
class LinkStatus:
    """What the link knows of control now; `seq` grows with every change."""

    state: str  # connecting, needs-login, pending, connected, unreachable, error, static
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, **self.extra}


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


def offers(prefs: Prefs, endpoints: tuple[Endpoint, ...] | None = None) -> dict[str, Any]:
    """What this node tells control it offers (protocol v1, `update`): `endpoints`
    are its candidates (reach/service.py), else the owner's own."""
    out: dict[str, Any] = {
        "endpoints": [str(e) for e in (prefs.advertise_endpoints if endpoints is None else endpoints)],
        "advertise_routes": [str(r) for r in prefs.advertise_routes],
        "advertise_exit_node": prefs.advertise_exit_node,
    }
    if prefs.advertise_dns is not None:  # only when set: a control from before names refuses the field
        out["advertise_dns"] = prefs.advertise_dns.to_json()
    return out


class ControlLink(threading.Thread):
    def __init__(
        self,
        state: StateDir,
        prefs: Callable[[], Prefs],
        offers: Callable[[Prefs], dict[str, Any]],
        bus: Bus,
    ) -> None:
        super().__init__(name="meshpi-control-link", daemon=True)
        self.state, self.prefs, self.offers, self.bus = state, prefs, offers, bus
        self.login_path = state.login_file
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._client: ControlClient | None = None
        self._hostname = ""
        # A rotation (from the link's thread or a caller's) and a reconnect's
        # register never interleave, or control could be told the old key last.
        self._register_lock = threading.Lock()
        self._changed = threading.Condition()
        self.status = LinkStatus("connecting", "the agent started; reaching control")
        self._mesh: Mesh | None = None  # of the last full map: deltas are checked against it
        # (server, version) of the last map handed to the loop. A new connection to the
        # same control (it restarted, the network moved) polls from there: control
        # answers with what changed, not 5,000 full maps at once. Forgotten when the
        # login changes (the loop's netmap is gone then).
        self._held: tuple[str, int] | None = None
        self._repoll = threading.Event()  # network_changed() ended the poll in flight on purpose
        self._capver = CAPVER

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def login_changed(self) -> None:
        self._held = None
        self.wake.set()

    def network_changed(self) -> None:
        """This host's addresses changed, or its public address did (roaming, a new
        WAN address at home): the long-poll in flight rode the old one and would hear
        nothing until it timed out (MAP_TIMEOUT). End it; the link polls again at once
        on a new connection, with the version it has (no new login)."""
        client = self._client
        if client is None:
            return
        self._repoll.set()
        if client.abort_polls():
            log.info("the network changed: polling control again on a new connection")

    def offers_changed(self, prefs: Prefs) -> None:
        """Prefs changed what this node offers: tell control now, not after the
        current long-poll."""
        client = self._client
        if client is None:
            return

        def send() -> None:
            try:
                client.call("update", self.offers(prefs))
            except (ControlUnreachable, ControlRefused) as e:
                log.warning("could not tell control about new prefs: %s", e)

        threading.Thread(target=send, name="meshpi-control-update", daemon=True).start()

    def _status(self, state: str, detail: str = "", **extra: Any) -> None:
        with self._changed:
            self.status = LinkStatus(state, detail, extra, self.status.seq + 1)
            self._changed.notify_all()

    def wait_for(self, after: int, states: tuple[str, ...], timeout: float) -> LinkStatus | None:
        """The first status newer than `after` (a seq) in one of `states`, or None
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                status = self.status
                if status.seq > after and status.state in states:
                    return status
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping.is_set():
            try:
                login = Login.load(self.login_path)
                if login is None:
                    self._held = None
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
        self.bus.put(KeyRotated(new.public_key()))
        log.info("rotated the node key from %s to %s", old, new.public_key())
        return new.public_key()

    def _serve(self, login: Login, backoff: Backoff) -> None:
        base, control_pub = parse_login_url(login.server)
        pin_control_key(self.state.control_pin_file, base, control_pub)
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
        held = self._held
        version = held[1] if held is not None and held[0] == login.server and self._mesh is not None else None
        if version is not None:
            log.info("polling control from the map version this agent holds (%d)", version)
        while not self.stopping.is_set():
            self._repoll.clear()
            try:
                answer = self._map(client, version)
            except ControlUnreachable:
                if not self._repoll.is_set():
                    raise
                continue  # ended on purpose (network_changed): poll again now, on a new connection
            version = int(answer["version"])
            if "keepalive" in answer:
                continue
            if "full" in answer:
                netmap = parse_netmap(answer["full"], "control (full map)")
                self._mesh = netmap.mesh
                self.bus.put(NetmapFull(netmap))
            elif "delta" in answer and self._mesh is not None:
                self.bus.put(NetmapDelta(parse_delta(answer["delta"], self._mesh, "control (delta)")))
            else:
                raise ValueError(f"control sent a map answer without a map or delta: {sorted(answer)}")
            self._held = (login.server, version)

    def _map(self, client: ControlClient, version: int | None) -> dict[str, Any]:
        """One long-poll, in the newest netmap version both sides know. A control
        from before versioning refuses the `capver` field: then speak version 1."""
        body: dict[str, Any] = {"version": version}
        if self._capver > 1:
            body["capver"] = self._capver
        try:
            return client.call("map", body, timeout=MAP_TIMEOUT)
        except ControlRefused as e:
            if e.status != 400 or "capver" not in e.message or self._capver == 1:
                raise
            log.info("control does not know netmap versions (%s): using version 1", e.message)
            self._capver = 1
            return client.call("map", {"version": version}, timeout=MAP_TIMEOUT)


def _hostname() -> str:
    import socket

    return socket.gethostname()

"""The agent's client of the control protocol: sealed requests over plain HTTP(S).

Synchronous on purpose: the control link runs in a worker thread of its own
(controllink.py), so a blocking call is the simplest thing that works, with only
the standard library (http.client). One connection per call: a node makes a few
calls a minute, and a fresh connection never inherits a half-dead one.

The client is shared by the link's thread and the short-lived threads that send
`update`, so the session and its request counter sit under a lock.

Also here: pinning the control key (StateDir.control_pin_file), trust on first use,
as the login URL is the only place the key comes from.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.base.errors import MeshpiError
from appliance.base.files import atomic_write
from appliance.wire.seal import (
    BadResponse,
    ControlPublicKey,
    MachineKey,
    open_response,
    seal_request,
)

log = logging.getLogger(__name__)

MAX_ANSWER = 64 << 20  # a full netmap of a big mesh is a few MiB; refuse a stream
REFUSAL_SHOWN = 300  # characters of a plain-text refusal kept in the error


class ControlError(Exception):
    pass


class ControlUnreachable(ControlError):
    """No answer: connection refused or reset, timeout, TLS or HTTP failure."""


class ControlBadResponse(ControlUnreachable):
    """Something answered, but not the control server we pinned, or not to this
    request. Treated as unreachable (retry later): it is not control's word."""


class ControlRefused(ControlError, MeshpiError):
    """Control answered with an error status (4xx, or 5xx if it is unwell)."""

    def __init__(self, status: int, message: str) -> None:
        MeshpiError.__init__(self, status, message)

    def __str__(self) -> str:
        return f"control refused: {self.status} {self.message}"


class ControlKeyChanged(ControlError, ValueError):
    """The login URL names another control key than the one pinned on first use."""


class ControlPinError(ControlError, ValueError):
    """control.json is unreadable."""


def _safe_text(data: bytes) -> str:
    """A refusal is plain, unauthenticated text: keep it short and printable."""
    text = data.decode("utf-8", errors="replace")[:REFUSAL_SHOWN]
    return "".join(c if c.isprintable() else " " for c in text).strip()


class ControlClient:
    def __init__(
        self,
        base_url: str,
        machine_key: MachineKey,
        control_pub: ControlPublicKey,
        timeout: float = 10.0,
        fwmark: int = 0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control URL {base_url!r} is not http(s)://host[:port][/path]")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.machine_key, self.control_pub, self.timeout = machine_key, control_pub, timeout
        # Marked like WireGuard's own packets, so talking to control never goes through
        # the mesh: with an exit node that is gone, the data plane fails closed, and
        # control must still be reachable to hear that it is back.
        self.fwmark = fwmark
        self._lock = threading.Lock()
        self._session: str | None = None
        self._number = 0  # the last request number used in the session
        self._polls: set[http.client.HTTPConnection] = set()  # long-polls in flight (op map)

    def __repr__(self) -> str:
        return f"ControlClient({self.base_url!r}, {self.machine_key!r})"

    def call(self, op: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One op; says hello first when there is no session, and again (once) when
        control answers `401 session` (it restarted, or the session expired)."""
        if op == "hello":
            raise ValueError("hello is the client's own business: call another op")
        wait = self.timeout if timeout is None else timeout
        session, number = self._next_request()
        try:
            return self._post(op, {"op": op, "session": session, "body": body}, number, wait)
        except ControlRefused as e:
            if e.status != 401:
                raise
            log.info("control at %s: %s; saying hello again", self.base_url, e.message)
            self._forget(session)
        session, number = self._next_request()
        return self._post(op, {"op": op, "session": session, "body": body}, number, wait)

    def abort_polls(self) -> int:
        """End the long-polls in flight at once (their callers get ControlUnreachable):
        after this host's address changed they ride a connection nobody answers on
        any more. Other ops are left alone. Returns how many were ended: a poll still
        connecting has no connection to end yet, and the one it makes uses the new address."""
        with self._lock:
            socks = [conn.sock for conn in self._polls if conn.sock is not None]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(socks)

    def hello(self) -> str:
        """Start a new session (call() does this by itself); returns its id."""
        answer = self._post("hello", {"op": "hello"}, 0, self.timeout)
        session = answer.get("session")
        if not isinstance(session, str):
            raise ControlBadResponse(f"{self.base_url}: hello answer has no session: {answer!r}")
        return session

    def _next_request(self) -> tuple[str, int]:
        # Held across hello so that threads starting together make one session.
        with self._lock:
            if self._session is None:
                self._session, self._number = self.hello(), 0
            self._number += 1
            return self._session, self._number

    def _forget(self, session: str) -> None:
        with self._lock:
            # Another thread may already have said hello again.
            if self._session == session:
                self._session = None

    def _post(self, op: str, plaintext: dict[str, Any], number: int, timeout: float) -> dict[str, Any]:
        sealed, nonce = seal_request(self.machine_key, self.control_pub, plaintext, number)
        url = f"{self.base_url}/v1/{op}"
        conn_type = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_type(self._host, self._port, timeout=timeout)
        if self.fwmark:
            conn._create_connection = _marked_connection(self.fwmark)  # type: ignore[attr-defined]
        poll = op == "map"
        if poll:
            with self._lock:
                self._polls.add(conn)
        try:
            headers = {"Content-Type": "application/octet-stream"}
            conn.request("POST", f"{self._prefix}/v1/{op}", body=sealed, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as e:
            # OSError covers refused, reset, unreachable, timeouts and TLS errors.
            raise ControlUnreachable(f"{url}: {type(e).__name__}: {e}") from None
        finally:
            if poll:
                with self._lock:
                    self._polls.discard(conn)
            conn.close()
        log.debug("control %s: %d (%d bytes)", op, response.status, len(data))
        if response.status != 200:
            raise ControlRefused(response.status, _safe_text(data))
        if len(data) > MAX_ANSWER:
            raise ControlBadResponse(f"{url}: answer over {MAX_ANSWER} bytes")
        try:
            return open_response(self.machine_key, self.control_pub, data, nonce)
        except BadResponse as e:
            raise ControlBadResponse(f"{url}: {e.message}") from None


def _marked_connection(mark: int) -> Callable[..., socket.socket]:
    """socket.create_connection, with SO_MARK set before connecting."""

    def connect(address: tuple[str, int], timeout: float | None = None, source: Any = None) -> socket.socket:
        host, port = address
        error: OSError = OSError(f"{host}: no address")
        for family, kind, proto, _name, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    return connect


# -- the pinned control key ---------------------------------------------------------


def pin_control_key(path: Path, base_url: str, control_pub: ControlPublicKey) -> None:
    """Trust on first use: remember control's key; refuse a different one later.

    The server's URL may change (a new address) and is updated; its key may not,
    because the key is the only thing that says it is the same server."""
    record = {"server": base_url, "control_key": str(control_pub)}
    try:
        text = path.read_text()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record) + "\n")
        log.info("pinned control key %s for %s in %s", control_pub, base_url, path)
        return
    except OSError as e:
        raise ControlPinError(f"{path}: cannot be read: {e.strerror}") from None
    pinned = _read_pin(path, text)
    if pinned.get("control_key") != str(control_pub):
        raise ControlKeyChanged(
            f"the login URL gives control key {control_pub}, but {path} pins "
            f"{pinned.get('control_key')} (for {pinned.get('server')}); if the server "
            f"really has a new key, delete {path} and log in again"
        )
    if pinned.get("server") != base_url:
        atomic_write(path, json.dumps(record) + "\n")
        log.info("control %s moved from %s to %s", control_pub, pinned.get("server"), base_url)


def _read_pin(path: Path, text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("control_key"), str):
        # Refuse rather than re-pin: a pin that can be reset by garbling it pins nothing.
        raise ControlPinError(f"{path}: not a control key pin ({text[:60]!r}); delete it and log in again")
    return doc

"""The agent's side of control's relay: a WebSocket to /v1/relay, and a local UDP
proxy per relayed peer, so the data plane stays kernel WireGuard.

    kernel WireGuard :listen_port  <-- UDP on 127.0.0.1 -->  proxy socket for peer P
                                                                  |   frames [P's node key | datagram]
                                                                  v
                                                     WebSocket to control's relay  <-->  P's relay client

For each relayed peer a UDP socket is bound to 127.0.0.1:<ephemeral>, and that
peer's WireGuard endpoint is set to it (`endpoint_for`). What WireGuard sends
there goes to the relay addressed to the peer; what the relay brings from the
peer goes out of that socket to WireGuard's port. WireGuard sees each relayed
peer at its own local address, so its roaming keeps the endpoint where we put it.
Only WireGuard ciphertext ever leaves: the relay cannot read it.

Synchronous, two threads: "relay-link" connects, authenticates, reads frames and
reconnects with backoff; "relay-proxy" waits on the proxy sockets (one selector)
and sends. `websockets.sync` is the WebSocket (pure Python with an optional C
speed-up, no asyncio HTTP stack on a 512 MB Pi). The connection carries the
WireGuard fwmark, like every control request, so it never goes through an exit
node (agent/control/client.py, _marked_connection).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from ipaddress import IPv4Address
from urllib.parse import urlsplit

from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import ClientConnection, connect

from appliance.agent.control.client import _marked_connection
from appliance.base.keys import KEY_LEN, PublicKey
from appliance.base.net import Endpoint
from appliance.wire.seal import (
    BadResponse,
    ControlPublicKey,
    MachineKey,
    b64,
    open_response,
    seal_request,
)

log = logging.getLogger(__name__)

PATH = "/v1/relay"
VERSION = 1
CHALLENGE_LEN = 32
MAX_FRAME = 64 * 1024
LOOPBACK = "127.0.0.1"
OPEN_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
# A connection that lived this long was a good one: the next failure starts the
# backoff from the bottom again.
STABLE = 10.0
# Close codes of the relay that mean "not until something changes" (relay.py).
REFUSED = {4401: "unauthenticated", 4403: "not approved"}


class RelayError(Exception):
    """The relay refused us, or is not the control server we pinned."""


@dataclass(frozen=True)
class RelayStats:
    connected: bool
    peers: int
    sent: int  # frames to the relay
    received: int  # frames from the relay, handed to WireGuard
    dropped_offline: int  # WireGuard sent while the relay was down
    dropped_unknown: int  # from the relay, from a peer we relay no more
    dropped_foreign: int  # on a proxy socket, not from WireGuard's port
    connects: int


class _Proxy:
    def __init__(self, peer: PublicKey) -> None:
        self.peer = peer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.setblocking(False)
        self.endpoint = Endpoint(IPv4Address(LOOPBACK), self.sock.getsockname()[1])


class RelayClient:
    """Relays WireGuard datagrams to peers through control; see the module doc.

    `node_key` is the key we expect the relay to know us by; when control says
    another (a rotation not yet seen here), that is logged and control wins."""

    def __init__(
        self,
        control_url: str,
        machine_key: MachineKey,
        control_pub: ControlPublicKey,
        node_key: PublicKey | None = None,
        listen_port: int = 51820,
        fwmark: int = 0,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        parts = urlsplit(control_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"control URL {control_url!r} is not http(s)://host[:port][/path]")
        if not 1 <= listen_port <= 65535:
            raise ValueError(f"listen port {listen_port!r} is not a UDP port")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        scheme = "wss" if self._tls else "ws"
        self.url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{PATH}"
        self.machine_key, self.control_pub, self.node_key = machine_key, control_pub, node_key
        self.listen_port, self.fwmark, self.backoff = listen_port, fwmark, backoff
        self._lock = threading.Lock()
        self._proxies: dict[bytes, _Proxy] = {}
        self._conn: ClientConnection | None = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: list[Callable[[], object]] = []  # selector changes, run by the proxy thread
        # Counters for stats(), each written by one thread only (no lock needed).
        self._counts = dict.fromkeys(("sent", "received", "offline", "unknown", "foreign", "connects"), 0)
        self._threads = [
            threading.Thread(target=self._link, name="relay-link", daemon=True),
            threading.Thread(target=self._proxy_loop, name="relay-proxy", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return f"RelayClient({self.url!r}, {self.machine_key!r})"

    # -- the API ------------------------------------------------------------------------

    def endpoint_for(self, peer: PublicKey) -> Endpoint:
        """The local endpoint to give WireGuard for `peer` (made on first call)."""
        with self._lock:
            proxy = self._proxies.get(peer.raw)
            if proxy is not None:
                return proxy.endpoint
            new = self._proxies[peer.raw] = _Proxy(peer)
        self._defer(lambda: self._selector.register(new.sock, selectors.EVENT_READ, new))
        log.info("relay: peer %s relayed through local endpoint %s", peer.short, new.endpoint)
        return new.endpoint

    def release(self, peer: PublicKey) -> None:
        """Stop relaying for `peer` (its path went direct, or it left the mesh)."""
        with self._lock:
            proxy = self._proxies.pop(peer.raw, None)
        if proxy is not None:
            log.info("relay: peer %s no longer relayed (%s closed)", peer.short, proxy.endpoint)
            self._defer(lambda: self._unregister(proxy))

    def release_others(self, keep: Collection[PublicKey]) -> None:
        """Stop relaying for every peer not in `keep`: peers that left the mesh or
        rotated to a new key (each proxy holds a socket)."""
        wanted = {key.raw for key in keep}
        with self._lock:
            gone = [proxy.peer for raw, proxy in self._proxies.items() if raw not in wanted]
        for peer in gone:
            self.release(peer)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def latency(self, timeout: float = 2.0) -> float | None:
        """Seconds for a WebSocket ping to control's relay and back (netcheck's relay
        latency); None while not connected or when no pong came in time."""
        conn = self._conn
        if conn is None or not self.connected:
            return None
        started = time.monotonic()
        try:
            pong = conn.ping()
        except (ConnectionClosed, OSError, RuntimeError):
            return None
        return time.monotonic() - started if pong.wait(timeout) else None

    def stats(self) -> RelayStats:
        c = self._counts
        with self._lock:
            peers = len(self._proxies)
        return RelayStats(
            self.connected, peers, c["sent"], c["received"], c["offline"], c["unknown"], c["foreign"],
            c["connects"],
        )  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            conn.close()
        self._wake()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        with self._lock:
            proxies, self._proxies = list(self._proxies.values()), {}
        for proxy in proxies:
            proxy.sock.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the proxy thread: WireGuard -> relay ------------------------------------------

    def _defer(self, change: Callable[[], object]) -> None:
        with self._lock:
            self._pending.append(change)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _unregister(self, proxy: _Proxy) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(proxy.sock)
        proxy.sock.close()

    def _proxy_loop(self) -> None:
        wireguard = (LOOPBACK, self.listen_port)
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, []
            for change in pending:
                change()
            for key, _ in self._selector.select():
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                proxy: _Proxy = key.data
                while True:
                    try:
                        data, source = proxy.sock.recvfrom(MAX_FRAME)
                    except (BlockingIOError, OSError):
                        break  # drained (or closed by release)
                    if source != wireguard:
                        self._counts["foreign"] += 1
                        continue
                    self._send(proxy.peer.raw + data)

    def _send(self, frame: bytes) -> None:
        conn = self._conn
        if conn is None:
            self._counts["offline"] += 1
            return
        try:
            conn.send(frame)
        except (ConnectionClosed, OSError, RuntimeError):
            self._counts["offline"] += 1  # the link thread notices and reconnects
            return
        self._counts["sent"] += 1

    # -- the link thread: connect, authenticate, relay -> WireGuard --------------------

    def _link(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            lived = None
            try:
                with self._open() as conn:
                    self._authenticate(conn)
                    lived = self._serve(conn)
            except (OSError, WebSocketException, RelayError, TimeoutError) as e:
                if lived is None:
                    log.warning("relay: cannot connect to %s: %s; again in %.1fs", self.url, _why(e), delay)
            if self._stop.is_set():
                return
            if lived is not None:
                if lived >= STABLE:
                    delay = self.backoff[0]
                log.warning("relay: lost %s after %.0fs; again in %.1fs", self.url, lived, delay)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.backoff[1])

    def _open(self) -> ClientConnection:
        """The WebSocket, on a socket of our own (marked), not yet authenticated."""
        if self.fwmark:
            sock = _marked_connection(self.fwmark)((self._host, self._port), OPEN_TIMEOUT)
        else:
            sock = socket.create_connection((self._host, self._port), OPEN_TIMEOUT)
        try:
            return connect(
                self.url, sock=sock, compression=None, max_size=MAX_FRAME, max_queue=256,
                proxy=None, open_timeout=OPEN_TIMEOUT, close_timeout=2, user_agent_header="meshpi-relay",
                ssl=ssl.create_default_context() if self._tls else None,
                server_hostname=self._host if self._tls else None,
            )  # fmt: skip
        except BaseException:
            sock.close()
            raise

    def _authenticate(self, conn: ClientConnection) -> None:
        try:
            hello = conn.recv(timeout=OPEN_TIMEOUT)
            if not isinstance(hello, bytes) or len(hello) != 1 + CHALLENGE_LEN or hello[0] != VERSION:
                raise RelayError(f"the relay's challenge is malformed ({len(hello)} bytes)")
            plaintext = {"op": "relay", "challenge": b64(hello[1:])}
            sealed, nonce = seal_request(self.machine_key, self.control_pub, plaintext)
            conn.send(sealed)
            answer = conn.recv(timeout=OPEN_TIMEOUT)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd is not None else None
            reason = e.rcvd.reason if e.rcvd is not None else "connection closed"
            raise RelayError(f"refused ({REFUSED.get(code or 0, code)}): {reason}") from None
        if not isinstance(answer, bytes):
            raise RelayError("the relay's answer is text, not sealed")
        try:
            body = open_response(self.machine_key, self.control_pub, answer, nonce)
        except BadResponse as e:
            raise RelayError(f"the relay is not the pinned control server: {e.message}") from None
        mine = body.get("node_key")
        if self.node_key is not None and mine != str(self.node_key):
            log.warning("relay: control knows this node as %s, not %s", mine, self.node_key)

    def _serve(self, conn: ClientConnection) -> float:
        """Relay -> WireGuard until the connection ends; returns how long it lived."""
        started = time.monotonic()
        self._conn = conn
        self._counts["connects"] += 1
        self._connected.set()
        log.info("relay: connected to %s", self.url)
        wireguard = (LOOPBACK, self.listen_port)
        try:
            for message in conn:
                if not isinstance(message, bytes) or len(message) <= KEY_LEN:
                    continue
                with self._lock:
                    proxy = self._proxies.get(message[:KEY_LEN])
                if proxy is None:
                    self._counts["unknown"] += 1
                    continue
                try:
                    proxy.sock.sendto(message[KEY_LEN:], wireguard)
                except OSError:
                    continue  # released meanwhile, or WireGuard's port is down
                self._counts["received"] += 1
        except (ConnectionClosed, OSError):
            pass
        finally:
            self._connected.clear()
            self._conn = None
        return time.monotonic() - started


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__

"""Endpoint discovery, run by the agent: STUN from the WireGuard port every 25 s
(well inside the 30 s a NAT commonly keeps an idle UDP mapping), and at once when
asked (a new WireGuard port, a link change, a user's `netcheck`). A round that no
server answered is tried again sooner (after RETRY_FIRST s, doubling up to the
interval): a lost datagram or a server that was restarting must not leave the node
without its public endpoint for 25 s.

The last result is typed and kept in memory (`last`); subscribers get each new one.
A change of the public address is logged once, when it happens; a failure that
repeats is logged once too, not every 25 s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.base.net import Endpoint
from appliance.kernel import stun as kstun
from appliance.kernel.base import KernelError

log = logging.getLogger(__name__)

INTERVAL = 25.0
TIMEOUT = 2.0
RETRY_FIRST = 1.0  # after a round no server answered; doubles up to INTERVAL


@dataclass(frozen=True)
class Port:
    """What to probe from: WireGuard's listen port and fwmark, as the device has them now."""

    listen_port: int
    fwmark: int


@dataclass(frozen=True)
class Discovery:
    v4: Endpoint | None  # the reflexive address of the WireGuard port over IPv4
    v6: Endpoint | None
    at: float  # time.time() of the probe
    server_v4: Endpoint | None  # which server said so
    server_v6: Endpoint | None
    varies_by_destination: bool | None  # symmetric NAT (v4); None: fewer than two v4 servers answered
    errors: tuple[str, ...] = ()  # why servers did not answer
    failed: tuple[Endpoint, ...] = ()  # which servers did not answer


Probe = Callable[[Endpoint, int, int, float], Endpoint]  # kernel.stun.probe's shape


def discover(servers: Sequence[Endpoint], port: Port, probe: Probe = kstun.probe,
             timeout: float = TIMEOUT) -> Discovery:  # fmt: skip
    """One round: the first server of each family that answers; a second v4 server,
    if there is one, tells whether the mapping varies by destination. A server on
    loopback (control on this very node) sees this node from inside, not through its
    NAT: its answer is used only when no other server answers, and never compared."""
    found: dict[int, tuple[Endpoint, Endpoint]] = {}
    inside: dict[int, tuple[Endpoint, Endpoint]] = {}  # loopback servers' answers
    errors: list[str] = []
    failed: list[Endpoint] = []
    varies: bool | None = None
    for server in servers:
        version = server.host.version
        loopback = server.host.is_loopback
        if loopback and (version in found or version in inside):
            continue
        if not loopback and version in found and (version == 6 or varies is not None):
            continue
        try:
            mapped = probe(server, port.listen_port, port.fwmark, timeout)
        except KernelError as e:
            errors.append(str(e))
            failed.append(server)
            continue
        if loopback:
            inside[version] = (mapped, server)
        elif version in found:
            varies = mapped != found[version][0]
        else:
            found[version] = (mapped, server)
    for family, answer in inside.items():
        found.setdefault(family, answer)
    v4, v6 = found.get(4), found.get(6)
    return Discovery(
        v4=v4[0] if v4 else None,
        v6=v6[0] if v6 else None,
        at=time.time(),
        server_v4=v4[1] if v4 else None,
        server_v6=v6[1] if v6 else None,
        varies_by_destination=varies,
        errors=tuple(errors),
        failed=tuple(failed),
    )


class StunDiscovery:
    """The periodic discovery thread. `port` is read before each round, so a changed
    listen port or fwmark is used from the next round on (call `probe_now`)."""

    def __init__(
        self,
        servers: Callable[[], Sequence[Endpoint]],
        port: Callable[[], Port | None],
        *,
        interval: float = INTERVAL,
        timeout: float = TIMEOUT,
        probe: Probe = kstun.probe,
    ) -> None:
        self._servers, self._port, self._probe = servers, port, probe
        self.interval, self.timeout = interval, timeout
        self._wake, self._stop = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._last: Discovery | None = None
        self._subscribers: list[Callable[[Discovery], None]] = []
        self._logged_failed: tuple[Endpoint, ...] = ()
        self._rounds = threading.Condition(self._lock)
        self.round = 0  # rounds completed
        self._thread = threading.Thread(target=self._run, name="meshpi-stun", daemon=True)

    @property
    def last(self) -> Discovery | None:
        with self._lock:
            return self._last

    def subscribe(self, callback: Callable[[Discovery], None]) -> None:
        """callback(discovery) after every round, on the discovery thread."""
        self._subscribers.append(callback)

    def start(self) -> StunDiscovery:
        self._thread.start()
        return self

    def probe_now(self) -> None:
        self._wake.set()

    def wait_round(self, after: int, timeout: float) -> Discovery | None:
        """Block until more than `after` rounds are done; the result then (None on timeout)."""
        with self._rounds:
            self._rounds.wait_for(lambda: self.round > after, timeout)
            return self._last if self.round > after else None

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout * 4 + 1)

    def _run(self) -> None:
        retry = RETRY_FIRST
        while not self._stop.is_set():
            result = None
            try:
                result = self.run_once()
            except Exception:  # noqa: BLE001 - a bug here must not end discovery for good
                log.exception("STUN discovery round failed")
            unanswered = result is not None and result.v4 is None and result.v6 is None
            self._wake.wait(min(retry, self.interval) if unanswered else self.interval)
            retry = retry * 2 if unanswered else RETRY_FIRST
            self._wake.clear()

    def run_once(self) -> Discovery | None:
        port, servers = self._port(), list(self._servers())
        if port is None or not servers:
            result = None
        else:
            result = discover(servers, port, self._probe, self.timeout)
            self._report(result)
        with self._rounds:
            if result is not None:
                self._last = result
            self.round += 1
            self._rounds.notify_all()
        if result is not None:
            for callback in list(self._subscribers):
                callback(result)
        return result

    def _report(self, new: Discovery) -> None:
        old = self._last
        for family, before, now in (("IPv4", old and old.v4, new.v4), ("IPv6", old and old.v6, new.v6)):
            if now is not None and now != before:
                was = f" (was {before})" if before else ""
                log.info("public %s address of the WireGuard port: %s%s", family, now, was)
        if new.varies_by_destination and not (old and old.varies_by_destination):
            log.warning("the NAT maps the WireGuard port differently per destination (symmetric NAT): "
                        "peers cannot reach this node at its STUN address")  # fmt: skip
        # Once per change of which servers fail: the messages themselves vary (counts).
        if new.failed != self._logged_failed:
            for error in new.errors:
                log.warning("%s", error)
            if not new.failed and self._logged_failed:
                log.info("STUN: every server answers again")
            self._logged_failed = new.failed

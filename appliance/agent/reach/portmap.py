"""Port mapping on the home router: the WireGuard port (or control's TCP port) made
reachable from the internet with no hand-made port forward.

    PortMapper(port=51820).start()  ...  .state  ...  .close()

It finds the gateway (the IPv4 default route), asks it with PCP, then NAT-PMP, then
UPnP-IGD, for a mapping of the node's LAN address:port (the external port the same
if the router has it free, else what the router gives), renews at half the lifetime,
and looks at the gateway every `probe_interval`: a PCP/NAT-PMP epoch that went back
(the router rebooted and forgot), a UPnP mapping that is gone, or a new WAN address
each lead to a fresh mapping. close() removes the mapping (`down`, `logout`).

Either driven by tick(now) (tests, or a loop that owns the clock), or by its own
thread (start()): the thread wakes at the next deadline, and close() ends it within
about a second (a PCP/NAT-PMP answer being waited for is abandoned; a UPnP call in
miniupnpc, ~1 s for discovery, runs to its end), removing the mapping from that same
thread, in the network namespace the mapper was started in.
The state is a frozen PortMapState, for `meshpi status`, the LocalAPI and the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from appliance.agent.reach.portmap_base import (
    Client,
    Lease,
    NoGateway,
    PortMapError,
    default_gateway,
    local_address,
)
from appliance.agent.reach.portmap_udp import NatPmpClient, PcpClient
from appliance.agent.reach.portmap_upnp import UpnpClient
from appliance.base.net import Endpoint
from appliance.wire import natpmp

logger = logging.getLogger(__name__)

PROTOCOLS = ("pcp", "nat-pmp", "upnp")
_NAMES = {"pcp": "PCP", "nat-pmp": "NAT-PMP", "upnp": "UPnP-IGD"}
DEFAULT_LIFETIME = natpmp.RECOMMENDED_LIFETIME
PROBE_INTERVAL = 30.0
RETRY_FIRST, RETRY_MAX = 5.0, 300.0
UNMAPPED_RENEW = 3600.0  # a permanent UPnP lease is still refreshed now and then

ClientFactory = Callable[[str, IPv4Address, IPv4Address, threading.Event], Client]


def make_client(protocol: str, gateway: IPv4Address, local: IPv4Address, cancel: threading.Event) -> Client:
    if protocol == "pcp":
        return PcpClient(gateway, local, cancel)
    if protocol == "nat-pmp":
        return NatPmpClient(gateway, local, cancel)
    if protocol == "upnp":
        return UpnpClient(gateway, local, cancel)
    raise ValueError(f"port mapping protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")


@dataclass(frozen=True)
class PortMapState:
    """What the mapper has now. protocol/external are None while nothing is mapped."""

    transport: str
    internal_port: int
    protocol: str | None = None  # which protocol answered: "pcp" | "nat-pmp" | "upnp"
    gateway: IPv4Address | None = None
    internal: Endpoint | None = None  # the node's LAN address and port
    external: Endpoint | None = None  # what the internet reaches
    lifetime: int = 0  # seconds granted; 0 with a mapping: until removed
    renewals: int = 0
    remaps: int = 0  # fresh mappings after a router reboot, a lost mapping or a WAN change
    epoch: int | None = None  # the gateway's PCP/NAT-PMP epoch: seconds since its mappings began
    last_error: str | None = None
    updated: float = 0.0  # time.monotonic() of the last change


class PortMapper:
    def __init__(
        self,
        port: int,
        transport: str = "udp",
        protocols: Sequence[str] = PROTOCOLS,
        lifetime: int = DEFAULT_LIFETIME,
        probe_interval: float = PROBE_INTERVAL,
        retry_interval: float = RETRY_FIRST,
        client_factory: ClientFactory = make_client,
        gateway: Callable[[], IPv4Address] = default_gateway,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport {transport!r} is not 'udp' or 'tcp'")
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"port {port!r} is not a port number")
        for protocol in protocols:
            if protocol not in PROTOCOLS:
                raise ValueError(f"port mapping protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.port, self.transport, self.protocols = port, transport, tuple(protocols)
        self.lifetime, self.probe_interval, self.retry_interval = lifetime, probe_interval, retry_interval
        self._factory, self._gateway = client_factory, gateway
        self._cancel = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._state = PortMapState(transport, port)
        self._client: Client | None = None
        self._lease: Lease | None = None
        self._epoch_seen: tuple[float, int] | None = None  # (our clock, the gateway's epoch)
        self._next_renew = self._next_probe = self._next_attempt = 0.0
        self._backoff = retry_interval
        self._thread: threading.Thread | None = None
        self._closed = False
        self._mapped_once = False

    # -- the state, for status/LocalAPI/dashboard --

    @property
    def state(self) -> PortMapState:
        with self._lock:
            return self._state

    def _set(self, **changes: object) -> None:
        with self._lock:
            self._state = replace(self._state, updated=time.monotonic(), **changes)  # type: ignore[arg-type]

    # -- one step --

    def tick(self, now: float) -> float:
        """Do what is due at `now` (time.monotonic()); returns when the next thing is due."""
        if self._closed:
            return float("inf")
        if self._lease is None:
            if now >= self._next_attempt:
                self._attempt(now)
        elif now >= self._next_renew:
            self._renew(now)
        elif now >= self._next_probe:
            self._probe(now)
        if self._lease is None:
            return self._next_attempt
        return min(self._next_renew, self._next_probe)

    def _attempt(self, now: float) -> None:
        errors: list[str] = []
        try:
            gateway = self._gateway()
            local = local_address(gateway)
        except NoGateway as exc:
            self._failed(now, str(exc))
            return
        for protocol in self.protocols:
            if self._cancel.is_set():
                return
            client = self._factory(protocol, gateway, local, self._cancel)
            try:
                lease = client.map(self.transport, self.port, self.port, self.lifetime)
            except PortMapError as exc:
                errors.append(str(exc))
                client.close()
                continue
            self._client = client
            self._granted(now, lease, gateway, fresh=True)
            return
        self._failed(now, "; ".join(errors) or "no protocol to try")

    def _failed(self, now: float, error: str) -> None:
        if error != self.state.last_error:
            logger.warning("port mapping of %s %d: %s", self.transport, self.port, error)
        self._next_attempt = now + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX)
        self._set(protocol=None, external=None, lifetime=0, last_error=error)

    def _granted(self, now: float, lease: Lease, gateway: IPv4Address, fresh: bool) -> None:
        old = self._lease
        self._lease, self._backoff = lease, self.retry_interval
        if lease.epoch is not None:
            self._epoch_seen = (now, lease.epoch)
        remapped = fresh and self._mapped_once
        self._mapped_once = True
        renew_in = lease.lifetime / 2 if lease.lifetime else UNMAPPED_RENEW
        self._next_renew = now + renew_in
        self._next_probe = now + self.probe_interval
        if old is None or old.external != lease.external or old.protocol != lease.protocol:
            logger.info("mapped %s %s -> %s on gateway %s with %s for %s", lease.transport, lease.internal,
                        lease.external, gateway, _NAMES[lease.protocol],
                        f"{lease.lifetime} s" if lease.lifetime else "ever")  # fmt: skip
        changes: dict[str, object] = {
            "protocol": lease.protocol, "gateway": gateway, "internal": lease.internal,
            "external": lease.external, "lifetime": lease.lifetime, "last_error": None, "epoch": lease.epoch,
        }  # fmt: skip
        state = self.state
        if not fresh:
            changes["renewals"] = state.renewals + 1
        elif remapped:
            changes["remaps"] = state.remaps + 1
        self._set(**changes)

    def _lost(self, now: float, why: str) -> None:
        """The mapping is gone or stale: map again at once, with the same client."""
        if self._cancel.is_set():  # an exchange cut short by close(): keep the lease to remove it
            return
        logger.warning("port mapping %s via %s: %s; mapping again", self.state.external,
                       self.state.protocol, why)  # fmt: skip
        assert self._client is not None and self._lease is not None
        gateway = self.state.gateway
        try:
            lease = self._client.map(self.transport, self.port, self._lease.external.port, self.lifetime)
        except PortMapError as exc:
            self._drop(now, f"{why}; mapping again failed: {exc}")
            return
        assert gateway is not None
        self._granted(now, lease, gateway, fresh=True)

    def _drop(self, now: float, error: str) -> None:
        if self._cancel.is_set():
            return
        if self._client is not None:
            self._client.close()
        self._client, self._lease, self._epoch_seen = None, None, None
        self._failed(now, error)
        # Start over soon (discovery again, maybe another protocol), not after the back-off.
        self._next_attempt = now + min(self.retry_interval, 1.0)

    def _gateway_moved(self) -> str | None:
        try:
            gateway = self._gateway()
        except NoGateway as exc:
            return str(exc)
        if gateway != self.state.gateway:
            return f"the default gateway is now {gateway}"
        return None

    def _renew(self, now: float) -> None:
        assert self._client is not None and self._lease is not None
        moved = self._gateway_moved()
        if moved:
            self._drop(now, moved)
            return
        try:
            lease = self._client.map(self.transport, self.port, self._lease.external.port, self.lifetime)
        except PortMapError as exc:
            self._drop(now, f"renewal failed: {exc}")
            return
        rebooted = self._rebooted(now, lease.epoch)
        if rebooted:
            logger.warning("gateway %s restarted (epoch %s); the renewal mapped afresh",
                           self.state.gateway, lease.epoch)  # fmt: skip
        gateway = self.state.gateway
        assert gateway is not None
        self._granted(now, lease, gateway, fresh=rebooted)

    def _probe(self, now: float) -> None:
        assert self._client is not None and self._lease is not None
        self._next_probe = now + self.probe_interval
        moved = self._gateway_moved()
        if moved:
            self._drop(now, moved)
            return
        try:
            seen = self._client.probe(self._lease)
        except PortMapError as exc:
            self._lost(now, f"the gateway did not answer a check: {exc}")
            return
        if self._rebooted(now, seen.epoch):
            self._lost(now, f"the gateway restarted (epoch {seen.epoch}) and forgot its mappings")
        elif seen.present is False:
            self._lost(now, "the gateway no longer has the mapping")
        elif seen.external_address is not None and seen.external_address != self._lease.external.host:
            self._lost(now, f"the WAN address changed to {seen.external_address}")
        elif seen.epoch is not None:
            self._epoch_seen = (now, seen.epoch)
            self._set(epoch=seen.epoch)

    def _rebooted(self, now: float, epoch: int | None) -> bool:
        if epoch is None or self._epoch_seen is None:
            return False
        then, before = self._epoch_seen
        return natpmp.epoch_lost(then, before, now, epoch)

    def check_now(self) -> None:
        """Look at the gateway at once (STUN saw a new public address): a changed WAN
        address is re-mapped without waiting for the next probe."""
        self._next_probe = 0.0
        self._wake.set()

    # -- its own thread --

    def start(self) -> PortMapper:
        """Run in a thread of its own (in the caller's network namespace)."""
        if self._thread is not None:
            raise RuntimeError("port mapper already started")
        self._thread = threading.Thread(target=self._run, name=f"portmap-{self.transport}-{self.port}",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._cancel.is_set():
                due = self.tick(time.monotonic())
                self._wake.wait(max(0.0, min(due - time.monotonic(), 3600.0)))
                self._wake.clear()
        except Exception:  # a bug must not silently leave a stale mapping: say so, then clean up
            logger.exception("port mapper thread failed")
            self._set(last_error="port mapper thread failed (see the log)")
        finally:
            self._remove()

    def _remove(self) -> None:
        lease, client = self._lease, self._client
        self._lease, self._client = None, None
        if lease is not None and client is not None:
            try:
                client.unmap(lease)
                logger.info("removed the port mapping %s -> %s (%s)", lease.external, lease.internal,
                            _NAMES[lease.protocol])  # fmt: skip
            except PortMapError as exc:
                logger.warning("could not remove the port mapping %s: %s", lease.external, exc)
            client.close()
        self._set(protocol=None, external=None, lifetime=0)

    def close(self, timeout: float = 10.0) -> None:
        """Stop, and remove the mapping from the gateway. Idempotent."""
        self._cancel.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        elif not self._closed:
            self._remove()
        self._closed = True

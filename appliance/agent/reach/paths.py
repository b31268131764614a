"""Path selection in the agent (control mode): the relay from the first moment,
direct paths proven beside it by connectivity checks from the WireGuard port,
back to the relay within seconds when a direct path dies. The decisions are
pathcore.py's (pure); the checks' codec and refusals are checkcore.py's; this
is the effects, on a thread of its own ("meshpi-paths"), every STEP seconds (every
QUIET_STEP while every peer is absent or idle: pathcore.needs_steps) and at once
when a check or an answer arrives:

- reads the device's per-peer handshake, endpoint and counters (every step while
  a peer without a session is being tried or kicked, else every SEEN_EVERY s:
  pathcore.watch_closely);
- reads the datagrams at the WireGuard port (checks.py): answers the peers'
  authenticated checks (never bigger than the check), takes authenticated
  answers to our own checks as proofs, refuses the rest unanswered;
- asks `pathcore.decide`, posts `PathsChosen` on the bus when the choices changed
  (the loop applies them), sends the checks it says, kicks the peers it says
  (their WireGuard peer removed and added again: a handshake initiation now);
- keeps a RelayClient (relay.py), made from the login once a netmap is applied
  and closed when it goes (logout) or the agent stops, with a local proxy for
  every peer: a direct peer keeps its proxy, so what the other side sends
  through the relay (it fell back first, or has not upgraded yet) still arrives.

Persistent keepalive is on for every peer with an endpoint (the planner), so a
punched NAT mapping stays open; the checks keep it open too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from appliance.agent.bus import PathsChosen, Update
from appliance.agent.reach.checks import Checker, PortFactory
from appliance.agent.reach.pathcore import decide, needs_steps, rekeyed, watch_closely
from appliance.agent.reach.pathtypes import QUIET_STEP, STEP, Decision, PeerPath, Seen, Timing
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.kernel.base import KernelError, WgDevice, WgUpdate
from appliance.kernel.stunport import StunPort

if TYPE_CHECKING:
    from appliance.agent.inputs import Inputs
    from appliance.agent.reach.relay import RelayClient
    from appliance.agent.statedir import StateDir
    from appliance.kernel.system import System

log = logging.getLogger(__name__)

GONE_KEPT = 120.0  # seconds a departed peer's path waits for the same node under a new key
SEEN_EVERY = 1.0  # seconds between device reads while no peer is being tried


class AgentView(Protocol):
    """What the chooser needs of the agent (loop.py's Agent is one)."""

    system: System | None
    key: PrivateKey  # the node key the kernel holds (or is about to)
    lock: threading.RLock

    def applied(self) -> Inputs | None: ...
    def read_device(self) -> WgDevice | None: ...


RelayFactory = Callable[["Inputs"], "RelayClient | None"]


def relay_from_login(state: StateDir) -> RelayFactory:
    """A RelayClient to the control server of the login, for the inputs applied."""

    def make(inputs: Inputs) -> RelayClient | None:
        from appliance.agent.control.link import Login
        from appliance.agent.reach.relay import RelayClient
        from appliance.wire.fields import ConfigError
        from appliance.wire.loginurl import LoginUrlError, parse_login_url

        try:
            login = Login.load(state.login_file)
            if login is None:
                return None
            url, control_pub = parse_login_url(login.server)
            return RelayClient(
                url, state.machine_key(), control_pub, inputs.netmap.self_node.public_key,
                inputs.prefs.listen_port, inputs.prefs.fwmark,
            )  # fmt: skip
        except (OSError, ValueError, ConfigError, LoginUrlError) as e:
            log.warning("no relay: %s", e)
            return None

    return make


class PathChooser:
    def __init__(
        self,
        agent: AgentView,
        post: Callable[[Update], None],
        relay: RelayFactory,
        clock: Callable[[], float] = time.monotonic,
        timing: Timing | None = None,
        port: PortFactory = StunPort,
    ) -> None:
        self.agent, self._post, self._make_relay, self._clock = agent, post, relay, clock
        self.timing = timing or Timing()
        self.checks = Checker(lambda: self.agent.key, port)
        self._relay: RelayClient | None = None
        self._relay_for: tuple[object, ...] | None = None  # what the relay client was made for
        self._peers: Mapping[PublicKey, PeerPath] = {}
        self._addresses: dict[PublicKey, tuple[object, ...]] = {}  # per peer, last step: rotations
        # Peers that left, by mesh addresses: a rotated key may come back a while later.
        self._gone: dict[tuple[object, ...], tuple[PublicKey, PeerPath, float]] = {}
        self._chosen: Mapping[PublicKey, Endpoint] = {}
        self._seen: dict[PublicKey, Seen] = {}
        self._seen_at = float("-inf")
        self._lock = threading.Lock()  # status() reads from the LocalAPI's threads
        self._stop = threading.Event()
        self._woke = threading.Event()  # this host's networks changed (network_changed)
        self._fast = True  # step every STEP (else QUIET_STEP): pathcore.needs_steps
        self._stepped_at = float("-inf")
        self._stepped_for: Inputs | None = None  # the inputs of the last step
        self._thread: threading.Thread | None = None

    # -- the thread ------------------------------------------------------------------

    def tick(self) -> None:
        """From the loop: start the thread on the first call (it runs by itself)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshpi-paths", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        arrived = False
        while not self._stop.is_set():
            if self._due(arrived):
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - a bug here must not end path selection for good
                    log.exception("paths: step failed")
                    self._stop.wait(1.0)
            if self.checks.port is not None:
                arrived = self.checks.wait(STEP)  # wakes at once for a check or an answer
            else:
                self._stop.wait(STEP)

    def _due(self, arrived: bool) -> bool:
        """Step now? Every STEP while a peer needs it (pathcore.needs_steps); else every
        QUIET_STEP, or at once for a datagram, a new netmap or a network change."""
        return (
            self._fast
            or arrived
            or self._woke.is_set()
            or self.agent.applied() is not self._stepped_for
            or self._clock() - self._stepped_at >= QUIET_STEP
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._close_relay()
        self.checks.close()

    # -- one step ------------------------------------------------------------------

    def step(self) -> None:
        inputs = self.agent.applied()
        now = self._clock()
        self._stepped_for, self._stepped_at, self._fast = inputs, now, True
        if inputs is None:
            self._drop_all()  # logged out: no netmap, no relay
            return
        relay = self._relay_client(inputs)
        self.checks.open(inputs.prefs.listen_port, inputs.prefs.fwmark)
        heard = self.checks.read({p.public_key for p in inputs.netmap.peers}, now)
        candidates = {p.public_key: _candidates(p.endpoints, p.endpoint) for p in inputs.netmap.peers}
        seen = self._read_seen(now)
        state = self._carry_rotated(inputs, seen, now)
        relay_up = relay is not None and relay.connected
        woke = self._woke.is_set()
        if woke:
            self._woke.clear()
        decision = decide(state, candidates, seen, heard, relay_up, now, self.timing, woke)
        self._fast = needs_steps(decision.peers, now, self.timing)
        choices = self._with_relay(decision, relay, candidates)
        for key, path in decision.peers.items():
            old = self._peers.get(key)
            if old is None or old.mode != path.mode or old.endpoint != path.endpoint:
                log.info("path to %s: %s", key.short, path.label())
        with self._lock:
            self._peers = decision.peers
        if choices != dict(self._chosen):
            self._chosen = choices
            self._post(PathsChosen(dict(choices)))
        self.checks.send(inputs.netmap.self_node.public_key, decision.checks, now)
        if decision.kicks or decision.repoint:
            self._kick(inputs, decision.kicks, decision.repoint, decision.peers)

    def _with_relay(
        self, decision: Decision, relay: RelayClient | None, candidates: Mapping[PublicKey, object]
    ) -> dict[PublicKey, Endpoint]:
        choices = dict(decision.choices)
        if relay is None:
            return choices
        for key in decision.peers:
            proxy = relay.endpoint_for(key)  # every peer: late relayed packets still arrive
            if key in decision.relayed:
                choices[key] = proxy
        # Peers gone from the netmap (removed, or rotated to a new key) give their
        # proxies back, whether or not this chooser still tracks them.
        relay.release_others(candidates)
        return choices

    def _read_seen(self, now: float) -> dict[PublicKey, Seen]:
        with self._lock:
            peers = self._peers
        closely = not self._seen or watch_closely(peers, self._seen, now, self.timing)
        if not closely and now - self._seen_at < SEEN_EVERY:
            return self._seen
        try:
            device = self.agent.read_device()
        except KernelError as e:
            log.debug("paths: cannot read the device: %s", e)
            return self._seen
        wall = time.time()
        before = self._seen
        self._seen = {} if device is None else {
            k: Seen(None if s.last_handshake is None else max(0.0, wall - s.last_handshake), s.endpoint,
                    s.rx_bytes, s.tx_bytes)
            for k, s in device.stats.items()
        }  # fmt: skip
        self._seen_at = now
        for key, now_seen in self._seen.items():
            was = before.get(key)
            if now_seen.handshake_age is not None and (was is None or was.handshake_age is None):
                log.debug("paths: first handshake with %s, at %s", key.short, now_seen.endpoint)
        return self._seen

    # -- kicks -----------------------------------------------------------------------

    def _kick(
        self,
        inputs: Inputs,
        keys: frozenset[PublicKey],
        repoint: Mapping[PublicKey, Endpoint],
        paths: Mapping[PublicKey, PeerPath],
    ) -> None:
        """Remove and re-add each peer that has no session, and send it a datagram:
        WireGuard forgets that it sent an initiation less than 5 s ago and sends one now.
        Put the proven endpoint back for each peer WireGuard roamed off it."""
        system = self.agent.system
        if system is None:
            return
        ifname = inputs.scope.interface
        addresses = {p.public_key: p.addresses for p in inputs.netmap.peers}
        with self.agent.lock:
            try:
                device = system.wireguard.read(ifname)
            except KernelError as e:
                log.debug("paths: cannot read %s: %s", ifname, e)
                return
            if device is None:
                return
            for key, endpoint in repoint.items():
                peer = device.peers.get(key)
                if peer is None or peer.endpoint == endpoint:
                    continue
                try:
                    system.wireguard.configure(ifname, WgUpdate(upsert=(replace(peer, endpoint=endpoint),)))
                    log.debug(
                        "paths: %s back at %s (WireGuard roamed to %s)", key.short, endpoint, peer.endpoint
                    )
                except KernelError as e:
                    log.warning("paths: could not put %s back at %s: %s", key.short, endpoint, e)
            for key in keys:
                peer, stats = device.peers.get(key), device.stats.get(key)
                handshake = stats.last_handshake if stats is not None else None
                if peer is None or (
                    handshake is not None and time.time() - handshake < self.timing.stale_after
                ):
                    continue  # a session came meanwhile: leave it
                try:
                    system.wireguard.configure(ifname, WgUpdate(remove=(key,)))
                    system.wireguard.configure(ifname, WgUpdate(upsert=(peer,)))
                    if addresses.get(key):
                        # Traffic for it: the initiation goes now (with or without keepalive).
                        system.links.probe(ifname, addresses[key][0])
                    # A change to the kernel: logged once per endpoint (the first of its kicks).
                    first = (path := paths.get(key)) is not None and path.kicks == 1
                    log.log(logging.INFO if first else logging.DEBUG,
                            "paths: handshake restarted with %s at %s (no session: peer re-added)",
                            key.short, peer.endpoint)  # fmt: skip
                except KernelError as e:
                    log.warning("paths: could not restart the handshake with %s: %s", key.short, e)

    # -- rotations, status, teardown ------------------------------------------------

    def _carry_rotated(
        self, inputs: Inputs, seen: Mapping[PublicKey, Seen], now: float
    ) -> dict[PublicKey, PeerPath]:
        """A peer that comes back under a new key (a rotation: control removes the
        old key first, adds the new one later) keeps the path it had."""
        current: dict[PublicKey, tuple[object, ...]] = {
            p.public_key: p.addresses for p in inputs.netmap.peers
        }
        for key, path in self._peers.items():
            if key not in current and self._addresses.get(key):
                self._gone[self._addresses[key]] = (key, path, now)
        self._gone = {a: g for a, g in self._gone.items() if now - g[2] < GONE_KEPT}
        state = {k: p for k, p in self._peers.items() if k in current}
        renamed: dict[PublicKey, PublicKey] = {}
        for key, addresses in current.items():
            gone = self._gone.pop(addresses, None) if key not in state else None
            if gone is not None:
                state[gone[0]] = gone[1]
                renamed[gone[0]] = key
        self._addresses = current
        return rekeyed(state, renamed, seen, now)

    def network_changed(self) -> None:
        """From the loop (netwatch's HostChanged): this host roamed, or its networks
        moved; every direct path is checked at the next step, idle or not."""
        self._woke.set()

    def status(self) -> dict[PublicKey, str]:
        """Per peer: "direct <endpoint>", "relayed" or "trying"."""
        with self._lock:
            return {key: path.label() for key, path in self._peers.items()}

    def _relay_client(self, inputs: Inputs) -> RelayClient | None:
        wanted = (inputs.prefs.listen_port, inputs.prefs.fwmark, inputs.netmap.self_node.public_key)
        if self._relay_for != wanted:
            self._close_relay()
            self._relay = self._make_relay(inputs)
            self._relay_for = wanted
        return self._relay

    def check_counters(self) -> dict[str, object]:
        """The connectivity checks' counts (checks.py): sent, proven, answered, refused by reason."""
        return self.checks.counters()

    def relay_latency(self) -> float | None:
        """A ping to control's relay now, in seconds (None: no relay connected)."""
        relay = self._relay
        return relay.latency() if relay is not None else None

    def _close_relay(self) -> None:
        if self._relay is not None:
            self._relay.close()
        self._relay, self._relay_for = None, None

    def _drop_all(self) -> None:
        if self._peers or self._relay is not None:
            log.info("paths: no netmap; relay closed")
        self._close_relay()
        self.checks.close()
        with self._lock:
            self._peers = {}
        self._chosen, self._addresses, self._gone, self._seen = {}, {}, {}, {}


def _candidates(endpoints: tuple[Endpoint, ...], endpoint: Endpoint | None) -> tuple[Endpoint, ...]:
    """The netmap's candidates (capver 2), or its one endpoint (a static peer)."""
    if endpoints:
        return endpoints
    return (endpoint,) if endpoint is not None else ()

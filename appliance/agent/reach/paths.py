"""Path selection in the agent (control mode): hole punching through each peer's
candidate endpoints, the relay when none works, back to direct when a punch
succeeds later. The decisions are pathcore.py's (pure); this is the effects:

- each tick (the loop's, every couple of seconds) reads the device's per-peer
  handshake, endpoint and counters, asks `pathcore.decide`, posts `PathsChosen`
  on the bus when the choices changed (the whole map), and probes the peers it
  must hear from (an empty datagram into the tunnel: WireGuard starts a
  handshake, or the peer's kernel answers with an ICMP error, which is traffic
  back);
- a RelayClient (relay.py), made from the login once a netmap is applied and
  closed when it goes (logout) or the agent stops. A peer has its relay proxy
  except while its candidates are tried.

Persistent keepalive is on for every peer with an endpoint (the planner), so a
punched NAT mapping stays open.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from appliance.agent.bus import PathsChosen, Update
from appliance.agent.reach.pathcore import PeerPath, Seen, Timing, decide, rekeyed
from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint
from appliance.kernel.base import KernelError, WgDevice

if TYPE_CHECKING:
    from appliance.agent.inputs import Inputs
    from appliance.agent.reach.relay import RelayClient
    from appliance.agent.statedir import StateDir
    from appliance.kernel.system import System

log = logging.getLogger(__name__)

# Seconds between background tries of direct while relayed (pathcore.UPGRADE_EVERY);
# the lab sets it shorter so a test need not wait a minute.
UPGRADE_ENV = "MESHPI_PATH_UPGRADE_EVERY"
GONE_KEPT = 120.0  # seconds a departed peer's path waits for the same node under a new key


class AgentView(Protocol):
    """What the chooser needs of the agent (loop.py's Agent is one)."""

    system: System | None

    def applied(self) -> Inputs | None: ...
    def read_device(self) -> WgDevice | None: ...


RelayFactory = Callable[["Inputs"], "RelayClient | None"]


def relay_from_login(state: StateDir) -> RelayFactory:
    """A RelayClient to the control server of the login, for the inputs applied."""

    def make(inputs: Inputs) -> RelayClient | None:
        from appliance.agent.control.link import Login
        from appliance.agent.reach.relay import RelayClient
        from appliance.wire.fields import ConfigError
        from appliance.wire.seal import LoginUrlError, parse_login_url

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


def _timing() -> Timing:
    raw = os.environ.get(UPGRADE_ENV)
    if raw is None:
        return Timing()
    try:
        every = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using the default", UPGRADE_ENV, raw)
        return Timing()
    return Timing(upgrade_every=max(every, 5.0))


class PathChooser:
    def __init__(
        self,
        agent: AgentView,
        post: Callable[[Update], None],
        relay: RelayFactory,
        clock: Callable[[], float] = time.time,
        timing: Timing | None = None,
    ) -> None:
        self.agent, self._post, self._make_relay, self._clock = agent, post, relay, clock
        self.timing = timing or _timing()
        self._relay: RelayClient | None = None
        self._relay_for: tuple[object, ...] | None = None  # what the relay client was made for
        self._peers: Mapping[PublicKey, PeerPath] = {}
        self._addresses: dict[PublicKey, tuple[object, ...]] = {}  # per peer, last tick: rotations
        # Peers that left, by mesh addresses: a rotated key may come back a while later.
        self._gone: dict[tuple[object, ...], tuple[PublicKey, PeerPath, float]] = {}
        self._chosen: Mapping[PublicKey, Endpoint] = {}
        self._lock = threading.Lock()  # status() reads from the LocalAPI's threads

    def tick(self) -> None:
        inputs = self.agent.applied()
        if inputs is None:
            self._drop_all()  # logged out: no netmap, no relay
            return
        relay = self._relay_client(inputs)
        candidates = {p.public_key: _candidates(p.endpoints, p.endpoint) for p in inputs.netmap.peers}
        try:
            device = self.agent.read_device()
        except KernelError as e:
            log.debug("paths: cannot read the device: %s", e)
            return
        seen = {} if device is None else {k: Seen(s.last_handshake, s.endpoint, s.rx_bytes, s.tx_bytes)
                                          for k, s in device.stats.items()}  # fmt: skip
        self._peers = self._carry_rotated(inputs, seen)
        # Fall back only to a relay that is there (it may be reconnecting after
        # control restarted): else the candidates are tried again.
        relay_up = relay is not None and relay.connected
        decision = decide(self._peers, candidates, seen, relay_up, self._clock(), self.timing)
        choices = dict(decision.choices)
        if relay is not None:
            # The relay carries a peer except while trying (its relayed packets
            # would roam WireGuard away from the candidate). A direct peer keeps
            # its proxy: when the other side falls back first, its packets come
            # in there and WireGuard roams to the relay (adopted), no waiting.
            for key, path in decision.peers.items():
                if path.mode == "trying":
                    relay.release(key)
                else:
                    proxy = relay.endpoint_for(key)
                    if key in decision.relayed:
                        choices[key] = proxy
            # Peers gone from the netmap (removed, or rotated away: _carry_rotated
            # has already dropped them from self._peers) give their proxies back.
            relay.release_others(candidates)
        for key, path in decision.peers.items():
            old = self._peers.get(key)
            if old is None or old.mode != path.mode or old.endpoint != path.endpoint:
                log.info("path to %s: %s", key.short, path.label())
        with self._lock:
            self._peers = decision.peers
        if choices != dict(self._chosen):
            self._chosen = choices
            self._post(PathsChosen(dict(choices)))
        self._probe(inputs, decision.probes)

    def _carry_rotated(self, inputs: Inputs, seen: Mapping[PublicKey, Seen]) -> dict[PublicKey, PeerPath]:
        """A peer that comes back under a new key (a rotation: control removes the
        old key first, adds the new one later) keeps the path it had."""
        now = self._clock()
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

    def status(self) -> dict[PublicKey, str]:
        """Per peer: "direct <endpoint>", "relayed" or "trying"."""
        with self._lock:
            return {key: path.label() for key, path in self._peers.items()}

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay, self._relay_for = None, None

    def _relay_client(self, inputs: Inputs) -> RelayClient | None:
        wanted = (inputs.prefs.listen_port, inputs.prefs.fwmark, inputs.netmap.self_node.public_key)
        if self._relay_for != wanted:
            self.close()
            self._relay = self._make_relay(inputs)
            self._relay_for = wanted
        return self._relay

    def _drop_all(self) -> None:
        if self._peers or self._relay is not None:
            log.info("paths: no netmap; relay closed")
        self.close()
        with self._lock:
            self._peers = {}
        self._chosen, self._addresses, self._gone = {}, {}, {}

    def _probe(self, inputs: Inputs, keys: frozenset[PublicKey]) -> None:
        system = self.agent.system
        if system is None or not keys:
            return
        for peer in inputs.netmap.peers:
            if peer.public_key in keys and peer.addresses:
                try:
                    system.links.probe(inputs.scope.interface, peer.addresses[0])
                except KernelError as e:
                    log.debug("paths: probe of %s failed: %s", peer.name, e)


def _candidates(endpoints: tuple[Endpoint, ...], endpoint: Endpoint | None) -> tuple[Endpoint, ...]:
    """The netmap's candidates (capver 2), or its one endpoint (a static peer)."""
    if endpoints:
        return endpoints
    return (endpoint,) if endpoint is not None else ()

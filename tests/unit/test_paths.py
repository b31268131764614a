"""Path selection's pure core (appliance/agent/reach/pathcore.py): a scripted
kernel (handshake, endpoint, counters per tick) and a clock, nothing else."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address

from appliance.agent.reach.pathcore import Decision, PeerPath, Seen, Timing, decide, rekeyed
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint

PEER = PrivateKey.generate().public_key()
A = Endpoint(ip_address("198.51.100.7"), 51820)
B = Endpoint(ip_address("203.0.113.9"), 40000)
ROAMED = Endpoint(ip_address("203.0.113.9"), 40123)
RELAY = Endpoint(ip_address("127.0.0.1"), 33333)
T = Timing(upgrade_every=60.0)


class World:
    """One peer; each step is one tick of the agent's loop."""

    def __init__(self, cands: tuple[Endpoint, ...] = (A, B), relay: bool = True, now: float = 1000.0) -> None:
        self.cands, self.now = cands, now
        self.relay = relay
        self.state: Mapping[PublicKey, PeerPath] = {}
        self.rx = self.tx = 0
        self.handshake: float | None = None
        self.endpoint: Endpoint | None = cands[0] if cands else None
        self.last: Decision | None = None

    def tick(self, dt: float = 2.0, rx: int = 0, tx: int = 0, handshake: bool = False,
             endpoint: Endpoint | None = None) -> PeerPath:  # fmt: skip
        self.now += dt
        self.rx, self.tx = self.rx + rx, self.tx + tx
        if handshake:
            self.handshake = self.now
        if endpoint is not None:
            self.endpoint = endpoint  # WireGuard roamed (a packet came from there)
        seen = {PEER: Seen(self.handshake, self.endpoint, self.rx, self.tx)}
        self.last = decide(self.state, {PEER: self.cands}, seen, self.relay, self.now, T)
        self.state = self.last.peers
        chosen = self.chosen
        if chosen is not None and endpoint is None:
            self.endpoint = chosen  # the loop applied the choice
        return self.state[PEER]

    @property
    def chosen(self) -> Endpoint | None:
        assert self.last is not None
        return RELAY if PEER in self.last.relayed else self.last.choices.get(PEER)


def test_paths_first_candidate_that_answers_wins() -> None:
    w = World()
    assert w.tick().mode == "trying" and w.chosen == A
    assert w.last is not None and PEER in w.last.probes  # WireGuard is made to send a handshake
    w.tick(tx=148)  # the handshake initiation, unanswered
    w.tick(dt=4.0, tx=148)
    path = w.tick()
    assert path.mode == "trying" and w.chosen == B  # A got its 5 s; B now
    w.tick()
    path = w.tick(rx=92, tx=148, handshake=True)
    assert path.mode == "direct" and path.endpoint == B and w.chosen == B
    assert path.label() == f"direct {B}"


def test_paths_roam_during_trying_adopts_the_address_the_peer_came_from() -> None:
    w = World()
    w.tick()
    path = w.tick(rx=92, handshake=True, endpoint=ROAMED)
    assert path.mode == "direct" and path.endpoint == ROAMED and w.chosen == ROAMED


def test_paths_no_candidate_answers_relay() -> None:
    w = World()
    for _ in range(8):  # each candidate's 5 s start once WireGuard holds it
        path = w.tick(tx=148)
    assert path.mode == "relayed" and w.chosen == RELAY and path.label() == "relayed"


def test_paths_no_candidates_relay_at_once() -> None:
    w = World(cands=())
    assert w.tick().mode == "relayed" and w.chosen == RELAY


def test_paths_no_relay_goes_round_the_candidates_again() -> None:
    w = World(relay=False)
    seen = []
    for _ in range(10):
        w.tick(tx=148)
        seen.append(w.chosen)
    assert set(seen) == {A, B} and w.state[PEER].mode == "trying"


def test_paths_direct_path_dead_falls_back_to_the_relay_within_7s() -> None:
    w = World()
    w.tick()
    w.tick(rx=92, tx=148, handshake=True)
    for _ in range(5):
        assert w.tick(rx=100, tx=100).mode == "direct"  # pings answered
    start = w.now
    path = w.tick(tx=100)  # the path is cut: sent, nothing back
    assert path.mode == "direct" and w.last is not None and PEER in w.last.probes
    while path.mode == "direct":
        path = w.tick(tx=100)
    assert path.mode == "relayed" and w.chosen == RELAY and w.now - start <= 7.0


def test_paths_idle_peer_keepalives_alone_are_not_death() -> None:
    w = World()
    w.tick()
    w.tick(rx=92, tx=148, handshake=True)
    for _ in range(30):  # our keepalive, answered by the probe's ICMP error
        assert w.tick(tx=32).mode == "direct"
        assert w.tick(rx=32).mode == "direct"


def test_paths_stale_handshake_is_dead() -> None:
    w = World()
    w.tick()
    w.tick(rx=92, handshake=True)
    w.tick(dt=200.0, rx=10)
    assert w.state[PEER].mode == "relayed"


def test_paths_relayed_upgrades_at_the_slot_and_falls_back_when_the_punch_fails() -> None:
    w = World(now=959.0)
    for _ in range(8):
        w.tick(tx=148)
    assert w.state[PEER].mode == "relayed" and w.now < 1020  # relayed since 971..973
    w.tick(dt=1020.5 - w.now, rx=10, tx=10)
    path = w.state[PEER]
    assert path.mode == "trying" and path.upgrading and w.chosen == A  # the slot at 1020
    for _ in range(8):
        w.tick(tx=100)
    assert w.state[PEER].mode == "relayed" and w.chosen == RELAY


def test_paths_relayed_upgrade_succeeds() -> None:
    w = World(cands=(A,), now=959.0)
    for _ in range(4):
        w.tick(tx=148)
    assert w.state[PEER].mode == "relayed"
    w.tick(dt=1020.5 - w.now, rx=10, tx=10, handshake=True)
    assert w.chosen == A
    w.tick(rx=50, tx=50)  # WireGuard holds A from here on
    path = w.tick(rx=50, tx=50)
    assert path.mode == "direct" and path.endpoint == A


def test_paths_relayed_peer_punches_through_first_adopted() -> None:
    w = World(cands=(A,))
    for _ in range(4):
        w.tick(tx=148)
    assert w.state[PEER].mode == "relayed"
    path = w.tick(rx=80, endpoint=ROAMED)
    assert path.mode == "direct" and path.endpoint == ROAMED and w.chosen == ROAMED


def test_paths_direct_peer_that_fell_back_to_the_relay_is_followed() -> None:
    w = World()
    w.tick()
    w.tick(rx=92, tx=148, handshake=True)
    path = w.tick(rx=80, endpoint=RELAY)
    assert path.mode == "relayed" and w.chosen == RELAY


def test_paths_new_candidates_are_tried_at_once() -> None:
    w = World(cands=())
    assert w.tick().mode == "relayed"
    w.cands = (B,)
    path = w.tick()
    assert path.mode == "trying" and w.chosen == B


def test_paths_restart_keeps_a_working_direct_path() -> None:
    w = World()
    w.handshake = w.now
    w.endpoint = ROAMED
    path = w.tick()
    assert path.mode == "direct" and path.endpoint == ROAMED


def test_paths_peer_gone_is_forgotten() -> None:
    w = World()
    w.tick()
    decision = decide(w.state, {}, {}, True, w.now + 2)
    assert not decision.peers and not decision.choices


def test_paths_failed_upgrades_wait_longer_each_time() -> None:
    w = World(cands=(A,), now=959.0)
    starts = []
    for _ in range(600):
        before = w.state.get(PEER)
        path = w.tick(tx=10)
        if path.upgrading and (before is None or not before.upgrading):
            starts.append(w.now)
    gaps = [round(b - a) for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[:4] == [60, 120, 240, 480], gaps  # on 60 s slots, the wait doubled per failure (8x at most)


def test_paths_endpoint_wireguard_holds_is_tried_after_the_netmaps() -> None:
    w = World(cands=())
    w.endpoint = ROAMED  # carried over a key rotation: no handshake with the new key yet
    assert w.tick().mode == "trying" and w.chosen == ROAMED
    assert w.tick(rx=92, handshake=True).mode == "direct"


def test_paths_no_relay_to_fall_back_to_tries_again() -> None:
    w = World(relay=False)
    w.tick()
    w.tick(rx=92, tx=148, handshake=True)
    path = w.tick(rx=10, tx=10)
    assert path.mode == "direct"
    for _ in range(4):
        path = w.tick(tx=100)
    assert path.mode == "trying" and w.chosen == A


def test_paths_rotated_peer_keeps_its_path_under_the_new_key() -> None:
    w = World()
    w.tick()
    w.tick(rx=92, tx=148, handshake=True)
    new = PrivateKey.generate().public_key()
    carried = rekeyed(w.state, {PEER: new}, {new: Seen(None, B, 0, 0)}, w.now)
    assert PEER not in carried and carried[new].mode == "direct" and carried[new].endpoint == A
    assert (carried[new].rx, carried[new].tx) == (0, 0)

    # The new key has no handshake yet: that is not staleness, for one try's time.
    decision = decide(carried, {new: (A, B)}, {new: Seen(None, A, 0, 0)}, True, w.now + 2)
    assert decision.peers[new].mode == "direct"

"""Path selection's pure core (appliance/agent/reach/pathcore.py): a scripted
kernel (handshake, endpoint, counters), the checks' results and a clock.

These tests cover which path each peer gets (the relay at once, the candidates
checked, direct once a check is answered, back to the relay when the answers
stop) and how often its checks go: backing off while relayed, seldom for an
absent peer, as seldom as a keepalive on an idle direct path, and at once when
data flows again or the network changes. What the chooser makes of the kernel's
WireGuard state is in test_paths_kernel.py, how often it steps in
test_paths_steps.py; both use World from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import ip_address

from appliance.agent.reach.pathcore import decide, watch_closely
from appliance.agent.reach.pathtypes import Decision, Heard, PeerPath, Seen, Timing
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint

PEER = PrivateKey.generate().public_key()
A = Endpoint(ip_address("198.51.100.7"), 51820)
B = Endpoint(ip_address("203.0.113.9"), 40000)
REFLEXIVE = Endpoint(ip_address("203.0.113.9"), 40123)
RELAY = Endpoint(ip_address("127.0.0.1"), 33333)
T = Timing()


class World:
    """One peer; each step is one of paths.py's (0.25 s apart by default)."""

    def __init__(self, cands: tuple[Endpoint, ...] = (A, B), relay: bool = True, now: float = 1000.0) -> None:
        self.cands, self.now, self.relay = cands, now, relay
        self.state: Mapping[PublicKey, PeerPath] = {}
        self.rx = self.tx = 0
        self.handshake_age: float | None = None
        self.endpoint: Endpoint | None = None
        self.last: Decision | None = None

    def step(self, dt: float = 0.25, answers: tuple[Endpoint, ...] = (), asked: tuple[Endpoint, ...] = (),
             rx: int = 0, session: bool | None = None, endpoint: Endpoint | None = None,
             tx: int = 0, woke: bool = False) -> PeerPath:  # fmt: skip
        self.now += dt
        self.rx += rx
        self.tx += tx
        if session is not None:
            self.handshake_age = 1.0 if session else None
        if endpoint is not None:
            self.endpoint = endpoint  # WireGuard roamed (a packet came from there)
        seen = {PEER: Seen(self.handshake_age, self.endpoint, self.rx, self.tx)}
        heard = Heard({PEER: answers} if answers else {}, {PEER: asked} if asked else {})
        before = None if self.last is None else self.chosen
        self.last = decide(self.state, {PEER: self.cands}, seen, heard, self.relay, self.now, T, woke)
        self.state = self.last.peers
        if self.chosen is not None and self.chosen != before:
            self.endpoint = self.chosen  # the loop applied the new choice
        return self.state[PEER]

    @property
    def chosen(self) -> Endpoint | None:
        assert self.last is not None
        return RELAY if PEER in self.last.relayed else self.last.choices.get(PEER)

    @property
    def checked(self) -> tuple[Endpoint, ...]:
        assert self.last is not None
        return self.last.checks.get(PEER, ())

    def steps_until(self, seconds: float) -> list[tuple[Endpoint, ...]]:
        """Steps through `seconds` with nothing heard; the checks sent at each."""
        sent = []
        for _ in range(round(seconds / 0.25)):
            self.step()
            sent.append(self.checked)
        return sent

    def answered_for(self, seconds: float, rx: int = 0, tx: int = 0) -> list[float]:
        """Steps through `seconds`, each check answered at the next step (keepalives
        or data `rx`/`tx` bytes every step); the times checks went, from the start."""
        start, times = self.now, []
        for _ in range(round(seconds / 0.25)):
            self.step(answers=(A,) if self.checked else (), rx=rx, tx=tx)
            if self.checked:
                times.append(round(self.now - start, 2))
        return times


def test_paths_new_peer_is_relayed_at_once_and_every_candidate_checked() -> None:
    w = World()
    assert w.step().mode == "relayed" and w.chosen == RELAY
    assert w.checked == (A, B)


def test_paths_checks_back_off_to_every_two_seconds_while_relayed() -> None:
    w = World()
    w.step()
    sent = w.steps_until(12.0)
    times = [i * 0.25 for i, s in enumerate(sent) if s]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] <= 0.5 and max(gaps) == 2.0, gaps
    assert all(s in ((), (A, B)) for s in sent)


def test_paths_answer_makes_the_peer_direct_at_the_proven_address() -> None:
    w = World()
    w.step()
    path = w.step(answers=(B,))
    assert path.mode == "direct" and path.endpoint == B and w.chosen == B


def test_paths_best_candidate_wins_when_several_answer_together() -> None:
    w = World()
    w.step()
    assert w.step(answers=(B, A)).endpoint == A


def test_paths_check_from_the_peer_adds_its_address_and_checks_it_now() -> None:
    w = World()
    w.step()
    w.steps_until(1.0)
    w.step(asked=(REFLEXIVE,))
    assert w.checked == (A, B, REFLEXIVE)  # a triggered check: through the hole the peer just opened
    assert w.step(answers=(REFLEXIVE,)).endpoint == REFLEXIVE  # peer-reflexive, like ICE's


def test_paths_reflexive_addresses_are_bounded() -> None:
    w = World()
    w.step()
    for port in range(50000, 50020):
        w.step(asked=(Endpoint(ip_address("203.0.113.9"), port),))
    assert len(w.state[PEER].reflexive) == 4


def test_paths_direct_path_is_checked_every_second_and_kept_while_answered() -> None:
    w = World()
    w.step()
    w.step(answers=(A,))
    for _ in range(40):  # 10 s
        path = w.step(answers=(A,) if w.checked else ())
        assert path.mode == "direct"
    sent = w.steps_until(0.0)
    assert not sent


def test_paths_direct_path_without_answers_falls_back_to_the_relay_within_dead_after() -> None:
    w = World()
    w.step()
    w.step(answers=(A,))
    cut = w.now
    while w.step().mode == "direct":
        assert w.now - cut <= T.dead_after
    assert w.state[PEER].mode == "relayed" and w.chosen == RELAY
    assert w.now - cut <= T.dead_after + 0.25
    assert w.checked == (A, B)  # and trying again at once


def test_paths_packets_through_wireguard_keep_a_direct_path_alive() -> None:
    """A peer whose agent does not answer checks (an older one) but whose
    WireGuard talks to us from the direct address is not cut off."""
    w = World()
    w.step()
    w.step(rx=100, endpoint=A)  # its WireGuard reached ours directly (WireGuard roamed)
    assert w.state[PEER].mode == "relayed"  # one read: the endpoint may be one we just wrote
    w.step(rx=100)  # more from there, and WireGuard stayed: adopted
    assert w.state[PEER].mode == "direct" and w.chosen == A
    for _ in range(40):
        assert w.step(rx=100).mode == "direct"


def test_paths_packets_through_the_relay_are_no_proof_of_the_direct_path() -> None:
    w = World()
    w.step()
    w.step(answers=(A,))
    w.step(rx=100, endpoint=RELAY)  # the other side fell back first: WireGuard roamed
    for _ in range(round(T.dead_after / 0.25)):
        w.step(rx=100, endpoint=RELAY)
    assert w.state[PEER].mode == "relayed"


def test_paths_relay_stays_the_endpoint_while_checks_fail() -> None:
    """Trying direct costs the relayed traffic nothing: the endpoint never moves."""
    w = World()
    w.step()
    for _ in range(200):
        w.step()
        assert w.chosen == RELAY


def test_paths_no_relay_gives_wireguard_the_candidates_in_turn() -> None:
    w = World(relay=False)
    assert w.step().mode == "trying" and w.chosen == A
    w.steps_until(T.try_each)
    assert w.chosen == B
    w.steps_until(T.try_each)
    assert w.chosen == A
    w.relay = True
    assert w.step().mode == "relayed" and w.chosen == RELAY


def test_paths_relay_lost_while_relayed_tries_the_candidates() -> None:
    w = World()
    w.step()
    w.relay = False
    assert w.step().mode == "trying" and w.chosen == A


def test_paths_no_candidates_relayed_and_nothing_checked() -> None:
    w = World(cands=())
    assert w.step().mode == "relayed" and not w.checked


def test_paths_new_candidates_are_checked_at_once() -> None:
    w = World()
    w.step()
    w.steps_until(6.0)
    w.cands = (B, REFLEXIVE)
    w.step()
    assert w.checked == (B, REFLEXIVE)


def test_paths_late_answer_makes_the_checks_of_a_direct_path_faster() -> None:
    w = World()
    w.step()
    w.step(answers=(A,))
    sent = w.steps_until(2.25)
    times = [i * 0.25 for i, s in enumerate(sent) if s]
    assert times[:2] == [0.75, 1.75] or times[0] <= 1.0, times
    assert len(times) >= 3, times  # 1 s, then every 0.25 s once the answer is late


def test_paths_absent_peer_is_checked_seldom_until_it_shows_up() -> None:
    w = World()
    w.step()
    w.steps_until(T.active_for)
    sent = w.steps_until(60.0)
    assert 3 <= sum(1 for s in sent if s) <= 7  # gaps doubling up to IDLE_EVERY, not every 2 s
    w.step(asked=(REFLEXIVE,))  # its check: it is there, check back now and often
    assert w.checked
    sent = w.steps_until(10.0)
    assert sum(1 for s in sent if s) >= 5


def _watched(w: World) -> bool:
    return watch_closely(w.state, {PEER: Seen(w.handshake_age, w.endpoint, w.rx, w.tx)}, w.now, T)


def test_paths_device_read_every_step_only_while_a_peer_is_tried() -> None:
    w = World()
    w.step(endpoint=RELAY)  # the kernel holds the relay's proxy: kicks begin
    assert _watched(w)  # a new peer: its first handshake is awaited closely
    w.steps_until(T.active_for)
    assert not _watched(w)  # offline (nothing from it, kicks spent): read once a second
    w.step(asked=(REFLEXIVE,))  # it checks us: it is there
    assert _watched(w)
    w.step(session=True)
    assert not _watched(w)  # a session: the slow rate is enough


def _direct_at_a() -> World:
    w = World()
    w.step()
    w.step(answers=(A,))
    return w


def test_paths_idle_direct_path_is_checked_only_as_often_as_a_keepalive() -> None:
    w = _direct_at_a()
    times = w.answered_for(T.busy_for + 3 * T.idle_direct_every)
    idle = [t for t in times if t > T.busy_for + 1]
    gaps = [b - a for a, b in zip(idle, idle[1:], strict=False)]
    assert len(idle) == 3 and all(g == T.idle_direct_every for g in gaps), times
    assert sum(1 for t in times if t <= T.busy_for) >= T.busy_for - 1  # every second while young
    assert w.state[PEER].mode == "direct"


def test_paths_keepalives_and_handshakes_leave_a_direct_path_idle() -> None:
    w = _direct_at_a()
    w.answered_for(T.busy_for + 1)
    times = w.answered_for(60.0, rx=32)  # the peer's keepalive (and ours) read at each step
    assert len(times) <= 3, times
    times = w.answered_for(2.0, tx=148, rx=92)  # a rekey's handshake
    assert len(times) <= 1, times


def test_paths_busy_direct_path_is_checked_every_second() -> None:
    w = _direct_at_a()
    w.answered_for(T.busy_for + 1)
    times = w.answered_for(20.0, tx=128, rx=128)  # pings through the tunnel
    assert times[0] == 0.25 and len(times) >= 19, times  # at once when data flows again


def test_paths_data_after_idle_checks_at_once_and_falls_back_fast_when_dead() -> None:
    w = _direct_at_a()
    w.answered_for(T.busy_for + 5)  # idle, last proven up to 25 s ago
    resumed = w.now
    w.step(tx=128)  # the owner sends: the path is looked at now, and it is dead
    assert w.checked == (A,)
    while w.step(tx=128).mode == "direct":
        assert w.now - resumed <= T.dead_after
    assert w.now - resumed <= T.dead_after - T.keep_every + 0.5 and w.chosen == RELAY


def test_paths_idle_path_whose_check_is_unanswered_falls_back_after_retries() -> None:
    w = _direct_at_a()
    w.answered_for(T.busy_for + T.idle_direct_every - 0.5)
    sent = w.steps_until(T.idle_direct_every)  # the next idle check is not answered
    assert w.state[PEER].mode == "relayed"
    first = next(i for i, s in enumerate(sent) if s)
    fell = next(i for i, s in enumerate(sent) if s == (A, B))  # relayed: every candidate checked
    assert sum(1 for s in sent[first:fell] if s) >= 3  # retried every FIRST_GAP, not dropped at once
    assert (fell - first) * 0.25 <= T.dead_after - T.keep_every + 0.25, (first, fell)


def test_paths_network_change_or_roam_checks_an_idle_direct_path_now() -> None:
    w = _direct_at_a()
    w.answered_for(T.busy_for + 5)
    w.step(woke=True)  # this host's networks changed
    assert w.checked == (A,)
    w.step(answers=(A,))
    w.answered_for(T.busy_for + 5)
    w.step(endpoint=REFLEXIVE)  # WireGuard roamed: the peer's packet came from elsewhere
    assert w.checked == (A,)
    w.answered_for(T.busy_for + 5)
    w.step(asked=(REFLEXIVE,))  # the peer checks us from a new address
    assert w.checked == (A,)

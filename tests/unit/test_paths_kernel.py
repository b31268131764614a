"""Path selection's pure core (appliance/agent/reach/pathcore.py) against what the
kernel's WireGuard shows, with test_paths.py's scripted World.

These tests cover the chooser's start (the kernel's endpoint is checked, not
trusted), a WireGuard roam that the agent's own write undid, handshake kicks
(when the kernel holds the path, how many, and afresh for a peer the kernel
lost and re-added), and peers that leave the kernel, rotate their key or are
roamed to the relay's proxy while a direct path is proven.
"""

from __future__ import annotations

from appliance.agent.reach.pathcore import decide, rekeyed
from appliance.agent.reach.pathtypes import Heard, Seen
from appliance.base.keys import PrivateKey
from tests.unit.test_paths import PEER, RELAY, A, B, T, World


def test_paths_restart_proves_the_kernels_path_at_once() -> None:
    """The kernel's endpoint when the chooser starts may be the netmap's candidate
    the agent's first apply wrote over WireGuard's roam: it is checked, not trusted.
    The relay carries the peer for the check's round trip."""
    w = World()
    w.endpoint, w.handshake_age, w.rx = B, 10.0, 5000
    path = w.step()
    assert path.mode == "relayed" and w.checked == (A, B)
    path = w.step(answers=(B,))
    assert path.mode == "direct" and path.endpoint == B and w.chosen == B


def test_paths_restart_without_a_relay_tries_the_kernels_endpoint_first() -> None:
    w = World(relay=False)
    w.endpoint, w.handshake_age, w.rx = B, 10.0, 5000
    assert w.step().mode == "trying" and w.chosen == B and w.checked == (A, B)


def test_paths_a_roam_our_write_undid_is_no_proof() -> None:
    """The peer's handshake came from where it really is (WireGuard roamed there),
    then the loop wrote the candidate being tried over the roam: the kernel shows
    the candidate and the counters grew. That is no proof of the candidate."""
    w = World(relay=False)
    w.step()  # read: no endpoint yet; tries A (applied after the roam: the kernel shows A)
    assert w.chosen == A
    assert w.step(rx=148, session=True).mode == "trying"
    assert w.step().mode == "trying"
    assert w.step(rx=32).mode == "direct"  # from A, with A held over a read: WireGuard stayed


def test_paths_no_session_is_kicked_when_the_kernel_holds_the_path() -> None:
    w = World()
    w.step()
    assert w.last is not None and PEER not in w.last.kicks  # the kernel does not hold the proxy yet
    w.step()
    assert PEER in w.last.kicks  # it does: initiate now
    w.step()
    assert PEER not in w.last.kicks  # not every step
    w.step(dt=T.kick_every)
    assert PEER in w.last.kicks
    w.step(answers=(A,))
    w.step()
    assert PEER in w.last.kicks  # a new endpoint: at once
    w.step(session=True)
    w.step(dt=T.kick_every)
    assert PEER not in w.last.kicks  # a session: never


def test_paths_kicks_stop_after_kick_max() -> None:
    w = World()
    kicks = 0
    for _ in range(100):
        w.step(dt=T.kick_every)
        assert w.last is not None
        kicks += PEER in w.last.kicks
    assert kicks == T.kick_max


def test_paths_peer_readded_to_the_kernel_is_kicked_afresh() -> None:
    """A peer the kernel lost (removed and re-added, WireGuard restarted) has no
    session at the same endpoint: its kicks start again."""
    w = World()
    for _ in range(40):
        w.step(dt=T.kick_every)
    assert w.last is not None and PEER not in w.last.kicks  # KICK_MAX used up at the relay's proxy
    gone = decide(w.state, {PEER: w.cands}, {}, Heard(), True, w.now + 1, T)  # not in the kernel
    back = {PEER: Seen(None, RELAY, 0, 0)}
    d = decide(gone.peers, {PEER: w.cands}, back, Heard(), True, w.now + 1.25, T)
    assert PEER in d.kicks


def test_paths_peer_readded_between_two_reads_is_kicked_afresh() -> None:
    """Removed and re-added before the chooser looked: the kernel's entry has never
    had a handshake, where the one before had."""
    w = World()
    for _ in range(T.kick_max + 4):
        w.step(dt=T.kick_every)  # no session at the relay's proxy: kicked KICK_MAX times
    w.step(session=True)  # then a session
    w.step(dt=T.kick_every)
    assert w.last is not None and PEER not in w.last.kicks
    w.step(session=False)  # the new entry at the same proxy: never a handshake
    assert PEER in w.last.kicks


def test_paths_peer_gone_is_forgotten() -> None:
    w = World()
    w.step()
    d = decide(w.state, {}, {}, Heard(), True, w.now + 1)
    assert d.peers == {} and not d.checks


def test_paths_rotated_peer_keeps_its_path_under_the_new_key() -> None:
    w = World()
    w.step()
    w.step(answers=(B,))
    new = PrivateKey.generate().public_key()
    moved = rekeyed(w.state, {PEER: new}, {new: Seen(None, B, 0, 0)}, w.now)
    assert PEER not in moved and moved[new].mode == "direct" and moved[new].endpoint == B
    d = decide(moved, {new: (A, B)}, {new: Seen(None, B, 0, 0)}, Heard(), True, w.now + 0.25)
    assert d.choices[new] == B and d.checks[new] == (B,)


def test_paths_wireguard_roamed_to_the_relay_is_put_back_on_the_proven_path() -> None:
    w = World()
    w.step()
    w.step(answers=(A,))
    w.step(answers=(A,), endpoint=RELAY)  # the other side's relayed packet: WireGuard roamed
    assert w.last is not None and w.last.repoint == {PEER: A}
    w.step(endpoint=RELAY)  # it roams again at once
    assert not w.last.repoint  # at most every KEEP_EVERY
    w.step(dt=T.keep_every, answers=(A,), endpoint=RELAY)
    assert w.last.repoint == {PEER: A}

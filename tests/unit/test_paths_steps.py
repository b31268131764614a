"""How often paths.py steps (pathcore.needs_steps): four times a second while some
peer's schedule is finer than a second, once a second when every peer is absent or
idle (100 offline peers stepped four times a second took 82 % of a core under qemu)."""

from __future__ import annotations

from appliance.agent.reach.pathcore import needs_steps
from tests.unit.test_paths import PEER, A, T, World, _direct_at_a


def fast(w: World) -> bool:
    return needs_steps(w.state, w.now, T)


def test_paths_steps_fast_for_a_new_peer_and_slow_once_it_is_absent() -> None:
    w = World()
    w.step()
    assert fast(w), "a new peer is tried: checks from FIRST_GAP on"
    w.steps_until(T.active_for - 1)
    assert fast(w)
    w.steps_until(2.0)
    assert w.state[PEER].mode == "relayed" and w.state[PEER].kicks == T.kick_max
    assert not fast(w), "absent for ACTIVE_FOR, kicks done: checked every IDLE_EVERY only"


def test_paths_steps_fast_again_when_an_absent_peer_checks() -> None:
    w = World()
    w.step()
    w.steps_until(T.active_for + 1)
    assert not fast(w)
    w.step(asked=(A,))
    assert fast(w)


def test_paths_steps_fast_while_kicks_are_under_way() -> None:
    w = World()
    w.step()
    w.steps_until(T.active_for + 1)
    w.step(session=True)
    w.step(session=False)  # the kernel forgot the handshake: the peer was re-added
    w.step()
    assert w.state[PEER].kicks >= 1 and fast(w)


def test_paths_steps_fast_for_a_busy_direct_path_slow_when_idle_fast_when_a_check_is_unanswered() -> None:
    w = _direct_at_a()
    assert fast(w), "just proven: checked every KEEP_EVERY"
    w.answered_for(T.busy_for + 1)
    assert not fast(w), "idle and answered: the next check in IDLE_DIRECT_EVERY"
    w.answered_for(T.idle_direct_every - 2)
    w.steps_until(2.0)  # the idle check goes, and is not answered
    assert w.state[PEER].mode == "direct" and fast(w), "resent every FIRST_GAP, dead after DEAD_AFTER"
    w.step(tx=128)
    assert fast(w)

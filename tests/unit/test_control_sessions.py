"""The server's session table, on a fake clock."""

from __future__ import annotations

import pytest

from appliance.control.sessions import (
    IDLE,
    MAX_PER_MACHINE,
    WINDOW,
    Replayed,
    SessionMalformed,
    Sessions,
    SessionUnknown,
    WrongMachine,
)
from appliance.wire.seal import MachineKey, make_nonce

A = MachineKey.generate().public_key()
B = MachineKey.generate().public_key()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_sessions_hello_then_requests_in_order(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    for n in range(1, 20):
        sessions.check(sid, A, make_nonce(n))
    assert len(sessions) == 1


def test_sessions_unknown_session_is_401(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sessions.hello(A)
    with pytest.raises(SessionUnknown) as e:
        sessions.check("bm90IGEgc2Vzc2lvbg==", A, make_nonce(1))
    assert e.value.status == 401 and e.value.message.startswith("session")


@pytest.mark.parametrize("sid", [None, 5, ["x"]])
def test_sessions_missing_session_id_is_400(clock: FakeClock, sid: object) -> None:
    with pytest.raises(SessionMalformed) as e:
        Sessions(clock).check(sid, A, make_nonce(1))
    assert e.value.status == 400


def test_sessions_request_number_zero_is_400(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    with pytest.raises(SessionMalformed):
        sessions.check(sessions.hello(A), A, make_nonce(0))


def test_sessions_wrong_machine_is_401_and_leaves_the_owner_alone(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    with pytest.raises(WrongMachine) as e:
        sessions.check(sid, B, make_nonce(1))
    assert e.value.status == 401
    sessions.check(sid, A, make_nonce(1))  # number 1 was not used up by B


def test_sessions_replay_is_409(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    nonce = make_nonce(1)
    sessions.check(sid, A, nonce)
    with pytest.raises(Replayed) as e:
        sessions.check(sid, A, nonce)
    assert e.value.status == 409
    with pytest.raises(Replayed):  # same number, other random part: still that request
        sessions.check(sid, A, make_nonce(1))


def test_sessions_overtaking_requests_within_the_window_are_accepted(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    for n in (3, 1, 2, 5, 4, WINDOW + 4):
        sessions.check(sid, A, make_nonce(n))
    sessions.check(sid, A, make_nonce(5 + 1))  # 6 was never seen and is within the window
    for n in (1, 2, 3, 4, 5, 6, WINDOW + 4):
        with pytest.raises(Replayed):
            sessions.check(sid, A, make_nonce(n))
    with pytest.raises(Replayed, match="too old"):
        sessions.check(sid, A, make_nonce(3))  # never accepted, but now behind the window


def test_sessions_huge_number_jump_stays_small_and_refuses_replays(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    sessions.check(sid, A, make_nonce(1))
    top = 2**64 - 1
    sessions.check(sid, A, make_nonce(top))
    with pytest.raises(Replayed):
        sessions.check(sid, A, make_nonce(top))
    with pytest.raises(Replayed):
        sessions.check(sid, A, make_nonce(1))
    sessions.check(sid, A, make_nonce(top - 1))


def test_sessions_expire_after_an_idle_hour(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    clock.now += IDLE - 1
    sessions.check(sid, A, make_nonce(1))  # use resets the idle time
    clock.now += IDLE - 1
    sessions.check(sid, A, make_nonce(2))
    clock.now += IDLE
    with pytest.raises(SessionUnknown):
        sessions.check(sid, A, make_nonce(3))
    assert len(sessions) == 0


def test_sessions_idle_ones_are_swept_by_a_hello(clock: FakeClock) -> None:
    sessions = Sessions(clock)
    for _ in range(5):
        sessions.hello(A)
    clock.now += IDLE
    sessions.hello(B)
    assert len(sessions) == 1


def test_sessions_end_after_max_requests(clock: FakeClock) -> None:
    sessions = Sessions(clock, max_requests=100)
    sid = sessions.hello(A)
    for n in range(1, 101):
        sessions.check(sid, A, make_nonce(n))
    with pytest.raises(SessionUnknown):
        sessions.check(sid, A, make_nonce(101))


def test_sessions_cap_evicts_the_least_recently_used(clock: FakeClock) -> None:
    sessions = Sessions(clock, max_sessions=3)
    first, second, third = (sessions.hello(A) for _ in range(3))
    sessions.check(first, A, make_nonce(1))  # first is now the most recently used
    fourth = sessions.hello(B)
    assert len(sessions) == 3
    with pytest.raises(SessionUnknown):
        sessions.check(second, A, make_nonce(1))
    for n, sid in enumerate((first, third, fourth), start=2):
        sessions.check(sid, B if sid == fourth else A, make_nonce(n))


def test_sessions_default_cap_is_documented() -> None:
    from appliance.control import sessions as module

    assert f"{module.MAX_SESSIONS:,}" in (module.__doc__ or "")


def test_sessions_flood_from_one_machine_key_evicts_only_its_own(clock: FakeClock) -> None:
    """A sealed-hello flood reusing one machine key, at a full table: the other
    machines' sessions all stay (before the per-machine bound, the flood pushed
    every one of them out)."""
    sessions = Sessions(clock, max_sessions=100)
    others = [MachineKey.generate().public_key() for _ in range(90)]
    kept = {m: sessions.hello(m) for m in others}
    for _ in range(10_000):
        clock.now += 0.001
        sessions.hello(A)
    assert len(sessions) == 90 + MAX_PER_MACHINE
    for n, (machine, sid) in enumerate(kept.items()):
        sessions.check(sid, machine, make_nonce(1))  # raises SessionUnknown if evicted
        assert n < 90


def test_sessions_flood_of_new_machine_keys_keeps_trusted_sessions(clock: FakeClock) -> None:
    """Machine keys are free to make; approved nodes are not. Sessions the server
    trusts (approved nodes) outlive a flood of hellos from fresh keys."""
    sessions = Sessions(clock, max_sessions=50)
    node_sid = sessions.hello(B)
    sessions.check(node_sid, B, make_nonce(1))
    sessions.trust(node_sid)
    for _ in range(500):
        sessions.hello(MachineKey.generate().public_key())
    assert len(sessions) == 50
    sessions.check(node_sid, B, make_nonce(2))
    # Its own next hello ends its oldest session once it has MAX_PER_MACHINE, and stays trusted.
    sids = [sessions.hello(B) for _ in range(MAX_PER_MACHINE)]
    with pytest.raises(SessionUnknown):
        sessions.check(node_sid, B, make_nonce(3))
    for _ in range(500):
        sessions.hello(MachineKey.generate().public_key())
    sessions.check(sids[-1], B, make_nonce(1))


def test_sessions_trusts_only_machines_with_a_trusted_session(clock: FakeClock) -> None:
    """What TrustedBoxes asks (app.py): only approved nodes' Boxes are cached, so a
    flood of fresh machine keys leaves no cache behind."""
    sessions = Sessions(clock)
    sid = sessions.hello(A)
    sessions.hello(B)
    assert not sessions.trusts(bytes(A)) and not sessions.trusts(bytes(B))
    sessions.trust(sid)
    assert sessions.trusts(bytes(A)) and not sessions.trusts(bytes(B))


def test_sessions_approved_nodes_hellos_are_trusted_at_once(clock: FakeClock) -> None:
    """After a restart every node says hello at once, before any of them made the
    request that would trust its session: the server knows which machines are
    approved nodes, and more of them than the untrusted cap all keep their sessions."""
    sessions = Sessions(clock, max_untrusted=10)
    nodes = [MachineKey.generate().public_key() for _ in range(30)]
    sids = [sessions.hello(m, approved=True) for m in nodes]
    for _ in range(100):  # a flood of fresh keys meanwhile
        sessions.hello(MachineKey.generate().public_key())
    for m, sid in zip(nodes, sids, strict=True):
        sessions.check(sid, m, make_nonce(1))
        assert sessions.trusts(bytes(m))
    stranger = MachineKey.generate().public_key()
    sessions.hello(stranger)
    assert not sessions.trusts(bytes(stranger))

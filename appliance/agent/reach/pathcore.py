"""Path selection, the pure part: which endpoint each peer gets, from what the
kernel says about it and the clock. No I/O: `decide` is a function of the last
state, this tick's observations and the time; paths.py does the effects.

Per peer, one of three modes:
- trying:  WireGuard is given the peer's candidates one by one (TRY_EACH seconds
           each). Both sides get the netmap change together and try at about the
           same time, so WireGuard's own handshake initiations punch the NAT holes.
           The first candidate a packet comes back from wins.
- direct:  a candidate (or the address WireGuard roamed to) works. It is dead
           when we sent and nothing came back for DEAD_AFTER seconds (a probe is
           sent after PROBE_AFTER to draw an answer from an idle peer), or its
           handshake is older than WireGuard's own REJECT_AFTER_TIME.
- relayed: every candidate failed (or there is none): the relay's local proxy.
           At each UPGRADE_EVERY slot of the wall clock (the same moment on both
           sides, with clocks in sync) the candidates are tried again; a success
           upgrades the peer to direct. Each failure doubles the wait (up to 8x):
           while trying, the relay does not carry the peer (or the peer's
           relayed packets would roam WireGuard back to the relay mid-try), so
           a try that fails costs its window's traffic.

Evidence is "received": the peer's rx counter grew while the kernel's endpoint
is a direct address (direct) or a relay proxy (relayed). WireGuard roams to the
address the last authenticated packet came from; a roam is adopted, never
fought (the other side fell back to the relay, or punched through first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint

TRY_EACH = 5.0  # WireGuard's REKEY_TIMEOUT: one handshake initiation per candidate
# Sent, probed (an answer takes one round trip), and nothing came back for this
# long: the path is gone. With the loop's 2 s tick the relay takes over 4-7 s after
# the cut.
DEAD_AFTER = 3.0
PROBE_AFTER = 0.0  # sent and not yet answered: draw an answer at once (paths.py: probe)
# WireGuard rejects a session older than REJECT_AFTER_TIME (180 s); keepalive
# traffic rekeys at 120-145 s, so an older handshake means no session at all.
STALE_AFTER = 180.0
UPGRADE_EVERY = 60.0  # a relayed peer tries direct again at each such slot
# A background try needs no handshake (the session exists): a probe's answer
# takes one round trip, plus the other side's tick (up to 2 s) to switch too.
UPGRADE_TRY = 3.0

Mode = Literal["trying", "direct", "relayed"]


@dataclass(frozen=True)
class Seen:
    """What the kernel says about one peer now."""

    last_handshake: float | None
    endpoint: Endpoint | None
    rx: int
    tx: int


@dataclass(frozen=True)
class PeerPath:
    mode: Mode
    candidates: tuple[Endpoint, ...]  # what is tried: the netmap's, and what WireGuard knew
    endpoint: Endpoint | None = None  # direct: the working address
    index: int = 0  # trying: the candidate being tried
    since: float = 0.0  # when this mode (or this candidate) started
    baseline: int | None = None  # trying: rx once WireGuard held the candidate
    upgrading: bool = False  # trying in the background while relayed
    fails: int = 0  # background tries that failed in a row (the next waits longer)
    given: tuple[Endpoint, ...] = ()  # the netmap's candidates (a change restarts the tries)
    rx: int = 0
    tx: int = 0
    unanswered_since: float | None = None  # sent after the last receipt, at this time

    def label(self) -> str:
        """For status: "direct <endpoint>", "relayed" or "trying"."""
        return f"direct {self.endpoint}" if self.mode == "direct" else self.mode


@dataclass(frozen=True)
class Timing:
    try_each: float = TRY_EACH
    dead_after: float = DEAD_AFTER
    probe_after: float = PROBE_AFTER
    stale_after: float = STALE_AFTER
    upgrade_every: float = UPGRADE_EVERY
    upgrade_try: float = UPGRADE_TRY


@dataclass(frozen=True)
class Decision:
    peers: Mapping[PublicKey, PeerPath]
    choices: Mapping[PublicKey, Endpoint]  # direct and trying peers: the endpoint to use
    relayed: frozenset[PublicKey]  # these get their relay proxy (paths.py)
    probes: frozenset[PublicKey]  # make WireGuard send to these now


def slot(now: float, every: float) -> int:
    return math.floor(now / every)


def is_relay(endpoint: Endpoint) -> bool:
    """The relay's proxies are on loopback (relay.py); a peer never is."""
    return endpoint.host.is_loopback


def decide(
    state: Mapping[PublicKey, PeerPath],
    candidates: Mapping[PublicKey, tuple[Endpoint, ...]],
    seen: Mapping[PublicKey, Seen],
    relay: bool,
    now: float,
    timing: Timing = Timing(),
) -> Decision:
    """One tick. `candidates`: the netmap's peers, best first; `relay`: whether
    there is a relay to fall back to now (a peer already relayed stays so)."""
    peers: dict[PublicKey, PeerPath] = {}
    choices: dict[PublicKey, Endpoint] = {}
    relayed: set[PublicKey] = set()
    probes: set[PublicKey] = set()
    for key, cands in candidates.items():
        old = state.get(key)
        path = _step(old, cands, seen.get(key), relay, now, timing)
        peers[key] = path
        chosen = _choice(path)
        if chosen is not None:
            choices[key] = chosen
        elif path.mode == "relayed":
            relayed.add(key)
        waiting = path.unanswered_since is not None and now - path.unanswered_since >= timing.probe_after
        if path.mode == "trying" or (path.mode == "direct" and waiting):
            probes.add(key)  # trying: start a handshake; direct: draw an answer (or prove it dead)
    return Decision(peers, choices, frozenset(relayed), frozenset(probes))


def rekeyed(
    state: Mapping[PublicKey, PeerPath],
    renamed: Mapping[PublicKey, PublicKey],
    seen: Mapping[PublicKey, Seen],
    now: float,
) -> dict[PublicKey, PeerPath]:
    """The state with each rotated peer's path carried to its new key (old key ->
    new key in `renamed`): the same node, the same path. Its counters start again
    from what the kernel says of the new key."""
    out = dict(state)
    for old_key, new_key in renamed.items():
        path = out.pop(old_key, None)
        if path is None or new_key in out:
            continue
        now_seen = seen.get(new_key)
        rx, tx = (now_seen.rx, now_seen.tx) if now_seen is not None else (0, 0)
        out[new_key] = replace(path, rx=rx, tx=tx, unanswered_since=None, baseline=None, since=now)
    return out


def _choice(path: PeerPath) -> Endpoint | None:
    if path.mode == "direct":
        return path.endpoint
    if path.mode == "trying" and path.index < len(path.candidates):
        return path.candidates[path.index]
    return None


def _start(cands: tuple[Endpoint, ...], has_relay: bool, now: float, base: PeerPath | None) -> PeerPath:
    """Try the candidates from the first; with none, the relay at once."""
    rx, tx = (base.rx, base.tx) if base is not None else (0, 0)
    given = base.given if base is not None else cands
    mode: Mode = "relayed" if not cands and has_relay else "trying"
    return PeerPath(mode, cands, since=now, rx=rx, tx=tx, given=given)


def _step(
    old: PeerPath | None,
    given: tuple[Endpoint, ...],
    seen: Seen | None,
    has_relay: bool,
    now: float,
    t: Timing,
) -> PeerPath:
    if old is None:
        known = seen.endpoint if seen is not None else None
        if known is not None and is_relay(known):
            known = None
        if seen is not None and known is not None and _fresh(seen, now, t):
            # The kernel already talks to it directly (the agent restarted): keep that.
            return PeerPath("direct", given, known, since=now, rx=seen.rx, tx=seen.tx, given=given)
        # What WireGuard already holds (carried over a key rotation, roamed to) is
        # worth a try too, after the netmap's own.
        cands = given + ((known,) if known is not None and known not in given else ())
        old = replace(_start(cands, has_relay, now, None), given=given)
        if seen is not None:
            old = replace(old, rx=seen.rx, tx=seen.tx)  # counters from here on
    path = old
    cands = old.candidates
    if given != old.given:
        cands = given
        path = replace(path, candidates=cands, given=given)
        if path.mode != "direct":
            path = _start(cands, has_relay, now, path)  # new candidates: try them now (fails reset)
    if seen is None:
        return path  # not in the kernel yet: nothing to learn
    received = seen.rx > path.rx
    sent = seen.tx > path.tx
    unanswered = None if received else (path.unanswered_since or (now if sent else None))
    path = replace(path, rx=seen.rx, tx=seen.tx, unanswered_since=unanswered)
    direct_now = seen.endpoint is not None and not is_relay(seen.endpoint)
    relayed_now = seen.endpoint is not None and is_relay(seen.endpoint)

    if path.mode == "direct":
        if received and relayed_now:
            return replace(path, mode="relayed", endpoint=None, since=now)  # the other side fell back
        if received and direct_now and seen.endpoint != path.endpoint:
            path = replace(path, endpoint=seen.endpoint)  # WireGuard roamed: adopt it
        dead = unanswered is not None and now - unanswered >= t.dead_after
        # No handshake at all yet (a rotated key's first): one try's time for it.
        stale = not _fresh(seen, now, t) and (
            seen.last_handshake is not None or now - path.since >= t.try_each
        )
        if dead or stale:
            if has_relay:
                return replace(path, mode="relayed", endpoint=None, since=now, unanswered_since=None)
            return _start(cands, has_relay, now, path)
        return path

    if path.mode == "relayed":
        if received and direct_now:
            # punched from there
            return replace(path, mode="direct", endpoint=seen.endpoint, since=now, fails=0)
        every = t.upgrade_every * 2 ** min(path.fails, 3)  # both sides fail alike: still in step
        if cands and slot(now, every) != slot(path.since, every):
            return replace(path, mode="trying", index=0, since=now, baseline=None, upgrading=True)
        return path

    # trying
    if path.index >= len(cands):
        return _start(cands, has_relay, now, path) if not has_relay else _relayed(path, now)
    candidate = cands[path.index]
    if path.baseline is None and seen.endpoint == candidate:
        # WireGuard holds the candidate from now on: its time starts now.
        path = replace(path, baseline=seen.rx, since=now)
        received = False
    # A packet came from a direct address: the candidate (once WireGuard held it),
    # or another address WireGuard roamed to (the peer punched from there).
    took = path.baseline is not None and seen.rx > path.baseline
    if received and direct_now and (took or seen.endpoint != candidate):
        return replace(path, mode="direct", endpoint=seen.endpoint, since=now, upgrading=False, baseline=None,
                       fails=0)  # fmt: skip
    if now - path.since >= (t.upgrade_try if path.upgrading else t.try_each):
        following = path.index + 1
        if following < len(cands):
            return replace(path, index=following, since=now, baseline=None)
        if has_relay:
            return _relayed(path, now)
        return replace(path, index=0, since=now, baseline=None)  # no relay: go round again
    return path


def _relayed(path: PeerPath, now: float) -> PeerPath:
    fails = path.fails + 1 if path.upgrading else path.fails
    return replace(path, mode="relayed", endpoint=None, index=0, since=now, baseline=None, upgrading=False,
                   fails=fails)  # fmt: skip


def _fresh(seen: Seen, now: float, t: Timing) -> bool:
    return seen.last_handshake is not None and now - seen.last_handshake < t.stale_after

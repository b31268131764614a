"""Path selection, the pure part: which endpoint each peer gets, and which
connectivity checks to send, from the checks' results, what the kernel says
about the peer, and the clock. No I/O: `decide` is a function of the last state,
this step's observations and the time; paths.py does the effects (every STEP s).

As ICE, NetBird and Tailscale do: the relay carries a peer from the first moment
it has no proven direct path, and direct paths are tried beside it, outside
WireGuard, by connectivity checks (checkcore.py: authenticated STUN Binding
requests from our WireGuard port to each of the peer's candidates, answered by
the peer's agent from its WireGuard port). A check's request opens our NAT for
the peer on WireGuard's own mapping; its answer proves the path both ways.

Per peer, one of three modes:
- relayed: the relay's local proxy (relay.py) is WireGuard's endpoint. Every
           candidate (the netmap's, and the peer-reflexive addresses its checks
           came from) is checked: at once, then at doubling gaps up to
           RELAYED_EVERY (IDLE_EVERY once nothing came from the peer for
           ACTIVE_FOR). An authenticated answer makes the peer direct. The
           relay keeps carrying the peer meanwhile: trying costs no traffic.
- direct:  a proven candidate is WireGuard's endpoint. While busy (data
           either way, or the path proven, within BUSY_FOR) it is checked every
           KEEP_EVERY; idle, every IDLE_DIRECT_EVERY only (as a keepalive), and
           at once when data flows again, WireGuard roams, the peer checks from
           elsewhere or this host's networks change (`woke`). Every FIRST_GAP
           once an answer is late; no answer (and no packet through WireGuard
           from it) for DEAD_AFTER, a check unanswered for DEAD_AFTER - KEEP_EVERY,
           and the relay carries the peer again. When WireGuard roamed to the relay's proxy
           (the other side still relays, or did for a moment) while the path
           answers, the proven address is put back (`repoint`, at most every
           KEEP_EVERY): else both WireGuards could stay on the relay for good.
- trying:  no relay is connected (control down, or none yet) and nothing is
           proven: WireGuard is given the candidates one by one (TRY_EACH
           seconds each), while the checks go on.

A peer whose WireGuard has no session yet is "kicked" (paths.py: its WireGuard
peer removed and added again, which resets WireGuard's 5 s rate limit on
handshake initiations and sends one now) each time the kernel holds a new
endpoint for it, then every KICK_EVERY for KICK_MAX times: the first handshake
goes as soon as a path is there, not 5 s after an initiation that was lost.

WireGuard roams to the address the last authenticated packet came from: a
peer whose packets arrive directly (it proved the path first, or an agent
without checks punched through) is adopted as direct, once the kernel's endpoint
held still over a read: the agent's own write (the netmap's candidate, one being
tried) may have just overwritten a roam, and counters do not say where packets
came from. So a path the kernel holds when the chooser starts is checked too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from appliance.agent.reach.pathtypes import (
    MAX_REFLEXIVE,
    Decision,
    Heard,
    Mode,
    PeerPath,
    Seen,
    Timing,
    carried_data,
    is_relay,
)
from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint

DEFAULT_TIMING = Timing()


def decide(
    state: Mapping[PublicKey, PeerPath],
    candidates: Mapping[PublicKey, tuple[Endpoint, ...]],
    seen: Mapping[PublicKey, Seen],
    heard: Heard,
    relay: bool,
    now: float,
    timing: Timing = DEFAULT_TIMING,
    woke: bool = False,
) -> Decision:
    """One step. `candidates`: the netmap's peers, best first; `relay`: whether a
    relay is connected now; `now`: monotonic seconds (for the schedules); `woke`:
    this host's networks changed (every direct path is checked now)."""
    peers: dict[PublicKey, PeerPath] = {}
    choices: dict[PublicKey, Endpoint] = {}
    relayed: set[PublicKey] = set()
    checks: dict[PublicKey, tuple[Endpoint, ...]] = {}
    kicks: set[PublicKey] = set()
    repoint: dict[PublicKey, Endpoint] = {}
    for key, cands in candidates.items():
        path = _step(state.get(key), cands, seen.get(key), heard, key, relay, now, timing, woke)
        path, sent = _schedule(path, now, timing)
        if sent:
            checks[key] = sent
        chosen = _choice(path)
        if chosen is not None:
            choices[key] = chosen
        elif path.mode == "relayed":
            relayed.add(key)
        path, kick = _kick(path, seen.get(key), chosen, now, timing)
        if kick:
            kicks.add(key)
        path, back = _repoint(path, seen.get(key), now, timing)
        if back is not None:
            repoint[key] = back
        peers[key] = path
    return Decision(peers, choices, frozenset(relayed), checks, frozenset(kicks), repoint)


def watch_closely(
    state: Mapping[PublicKey, PeerPath],
    seen: Mapping[PublicKey, Seen],
    now: float,
    t: Timing = DEFAULT_TIMING,
) -> bool:
    """Whether paths.py should read the kernel every step (else every second): only
    while a peer without a session is being tried (something came from it, or its
    try began, within ACTIVE_FOR) or kicked. A peer that is simply offline (a phone
    in a drawer, a laptop shut) waits at the slow rate: with 100 of them, reading and
    parsing the whole device four times a second kept a Pi's core busy (issue 14).
    It is back on the fast rate the moment it checks or sends (the step that hears
    it updates `active`)."""
    for key, path in state.items():
        now_seen = seen.get(key)
        if now_seen is not None and _fresh(now_seen, now, t):
            continue
        if now - path.active < t.active_for or (path.kicked_for is not None and path.kicks < t.kick_max):
            return True
    return False


def needs_steps(state: Mapping[PublicKey, PeerPath], now: float, t: Timing = DEFAULT_TIMING) -> bool:
    """Whether paths.py should step every STEP (else every QUIET_STEP, and at once when
    a check, a new netmap or a network change comes). Fast while some peer has a
    schedule finer than a second: a direct path in use (checked every KEEP_EVERY) or
    with a check unanswered (sent again every FIRST_GAP, dead after DEAD_AFTER), a
    peer tried or heard within ACTIVE_FOR (gaps from FIRST_GAP), a kick under way.
    Otherwise every peer is absent or idle, checked every IDLE_EVERY or
    IDLE_DIRECT_EVERY: with 100 offline peers, four steps a second over all of
    them took 82 % of a core under qemu (issue 14)."""
    for path in state.values():
        if path.mode == "direct":
            if now - path.busy < t.busy_for or path.probing <= now:
                return True
        elif now - path.active < t.active_for:
            return True
        if path.kicked_for is not None and path.kicks < t.kick_max:
            return True
    return False


def rekeyed(
    state: Mapping[PublicKey, PeerPath],
    renamed: Mapping[PublicKey, PublicKey],
    seen: Mapping[PublicKey, Seen],
    now: float,
) -> dict[PublicKey, PeerPath]:
    """The state with each rotated peer's path carried to its new key (old key ->
    new key in `renamed`): the same node, the same path. Its counters start again
    from what the kernel says of the new key, and it is proven afresh (its checks
    use the new key)."""
    out = dict(state)
    for old_key, new_key in renamed.items():
        path = out.pop(old_key, None)
        if path is None or new_key in out:
            continue
        now_seen = seen.get(new_key)
        out[new_key] = replace(path, rx=now_seen.rx if now_seen is not None else 0,
                               tx=now_seen.tx if now_seen is not None else 0, heard=now, since=now,
                               next_check=now, kicked_for=None, kicks=0, busy=now,
                               probing=float("inf"))  # fmt: skip
    return out


def _choice(path: PeerPath) -> Endpoint | None:
    if path.mode == "direct":
        return path.endpoint
    targets = path.targets()
    if path.mode == "trying" and targets:
        return targets[path.index % len(targets)]
    return None


def _fallback(path: PeerPath, has_relay: bool, now: float, t: Timing) -> PeerPath:
    """Nothing proven (any more): the relay if there is one, else try; check at once."""
    mode: Mode = "relayed" if has_relay else "trying"
    return replace(
        path,
        mode=mode,
        endpoint=None,
        since=now,
        index=0,
        next_check=now,
        gap=t.first_gap,
        active=now,
        probing=float("inf"),
    )


def _step(
    old: PeerPath | None,
    given: tuple[Endpoint, ...],
    seen: Seen | None,
    heard: Heard,
    key: PublicKey,
    has_relay: bool,
    now: float,
    t: Timing,
    woke: bool = False,
) -> PeerPath:
    known = seen.endpoint if seen is not None and seen.endpoint is not None else None
    direct_known = known if known is not None and not is_relay(known) else None
    if old is None:
        path = PeerPath("trying", given, rx=seen.rx if seen is not None else 0,
                        tx=seen.tx if seen is not None else 0, held=known)  # fmt: skip
        if direct_known is not None and direct_known not in given:
            path = replace(path, reflexive=(direct_known,))  # WireGuard's (the last agent's, a rotation's)
        path = _fallback(path, has_relay, now, t)  # every target checked now, the kernel's among them
        if direct_known is not None and path.mode == "trying":
            path = replace(path, index=path.targets().index(direct_known))  # tried first
        return path
    path = old
    if given != path.candidates:
        path = replace(path, candidates=given)
        if path.mode != "direct":
            path = replace(path, index=0, since=now, next_check=now, gap=t.first_gap, active=now)  # at once
    asked = heard.asked.get(key, ())
    for source in asked:
        if source not in path.targets():
            path = replace(path, reflexive=((source,) + path.reflexive)[:MAX_REFLEXIVE])
    if asked:
        path = replace(path, active=now)
    if asked and path.mode != "direct":
        path = replace(path, next_check=now, gap=t.first_gap)  # a triggered check: the hole is open now
    # Packets came from the kernel's endpoint only if it held still since the last read.
    received = seen is not None and seen.rx > path.rx and direct_known is not None and path.held == known
    data = False
    if seen is not None:
        data = carried_data(seen.rx - path.rx) or carried_data(seen.tx - path.tx)
        if seen.rx != path.rx or seen.tx != path.tx or path.held != known:  # (a copy per step is costly)
            path = replace(path, rx=seen.rx, tx=seen.tx, active=now if seen.rx > path.rx else path.active,
                           held=known)  # fmt: skip
    answers = heard.answers.get(key, ())

    if path.mode == "direct":
        if path.endpoint in answers or (received and direct_known == path.endpoint):
            path = replace(path, heard=now, probing=float("inf"))
        roamed = known is not None and known != path.endpoint  # WireGuard follows the peer elsewhere
        moved = any(source != path.endpoint for source in asked)  # the peer checks from elsewhere
        if data or roamed or moved or woke:
            if woke or now - path.busy >= t.busy_for:
                path = replace(path, next_check=min(path.next_check, now))  # it was idle: look now
            path = replace(path, busy=now)
        if now - path.heard >= t.dead_after and now - path.probing >= t.dead_after - t.keep_every:
            return _fallback(path, has_relay, now, t)
        return path

    if answers:
        best = next((c for c in path.targets() if c in answers), answers[0])
        return replace(path, mode="direct", endpoint=best, since=now, heard=now,
                       next_check=now + t.keep_every, busy=now, probing=float("inf"))  # fmt: skip
    if received and direct_known is not None and (path.mode == "relayed" or direct_known == _choice(path)):
        # The peer's WireGuard reached ours directly from there (it proved the path
        # first, or the candidate WireGuard was given answered).
        return replace(path, mode="direct", endpoint=direct_known, since=now, heard=now,
                       next_check=now + t.keep_every, busy=now, probing=float("inf"))  # fmt: skip
    if path.mode == "relayed" and not has_relay:
        return replace(path, mode="trying", since=now, index=0)
    if path.mode == "trying" and has_relay:
        return replace(path, mode="relayed", since=now)
    if path.mode == "trying" and now - path.since >= t.try_each:
        return replace(path, index=path.index + 1, since=now)
    return path


def _schedule(path: PeerPath, now: float, t: Timing) -> tuple[PeerPath, tuple[Endpoint, ...]]:
    """The checks due now, and when the next ones are."""
    if path.mode == "direct":
        return _schedule_direct(path, now, t)
    if now < path.next_check:
        return path, ()
    targets = path.targets()
    gap = min(path.gap * 2, t.relayed_every if now - path.active < t.active_for else t.idle_every)
    return replace(path, next_check=now + path.gap, gap=gap), targets


def _schedule_direct(path: PeerPath, now: float, t: Timing) -> tuple[PeerPath, tuple[Endpoint, ...]]:
    """Every KEEP_EVERY while busy, IDLE_DIRECT_EVERY while idle; a check still
    unanswered is sent again every FIRST_GAP (the regular schedule goes on)."""
    assert path.endpoint is not None
    unanswered = path.probing <= now
    if now < path.next_check and not (unanswered and now - path.checked >= t.first_gap):
        return path, ()
    every = t.keep_every if now - path.busy < t.busy_for else t.idle_direct_every
    next_check = path.next_check if now < path.next_check else now + every
    return replace(path, next_check=next_check, checked=now, probing=min(path.probing, now)), (path.endpoint,)


def _kick(
    path: PeerPath, seen: Seen | None, chosen: Endpoint | None, now: float, t: Timing
) -> tuple[PeerPath, bool]:
    """Whether to make WireGuard send a handshake initiation now (see the module doc)."""
    if seen is None:  # not in the kernel (yet, or any more): once back, it is kicked afresh
        return (replace(path, kicked_for=None, kicks=0, shook=False) if path.kicked_for or path.shook
                else path), False  # fmt: skip
    if seen.handshake_age is not None:
        path = replace(path, shook=True) if not path.shook else path
    elif path.shook:  # the kernel forgot every handshake: the peer was re-added (or WireGuard restarted)
        path = replace(path, kicked_for=None, kicks=0, shook=False)
    if _fresh(seen, now, t) or seen.endpoint is None:
        return path, False
    if path.mode == "relayed":
        if not is_relay(seen.endpoint):
            return path, False  # the proxy is not applied yet
    elif seen.endpoint != chosen:
        return path, False
    if path.kicked_for != seen.endpoint:
        return replace(path, kicked_for=seen.endpoint, kicked_at=now, kicks=1), True
    if path.kicks < t.kick_max and now - path.kicked_at >= t.kick_every:
        return replace(path, kicked_at=now, kicks=path.kicks + 1), True
    return path, False


def _repoint(path: PeerPath, seen: Seen | None, now: float, t: Timing) -> tuple[PeerPath, Endpoint | None]:
    if path.mode != "direct" or seen is None or seen.endpoint is None or not is_relay(seen.endpoint):
        return path, None
    if path.since == now:
        return path, None  # direct from this step on: the loop applies it
    if now - path.heard > t.keep_every + t.first_gap or now - path.repointed < t.keep_every:
        return path, None  # not proven just now, or put back a moment ago
    return replace(path, repointed=now), path.endpoint


def _fresh(seen: Seen, now: float, t: Timing) -> bool:
    return seen.handshake_age is not None and seen.handshake_age < t.stale_after

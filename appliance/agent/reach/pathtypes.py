"""Path selection's values and timings (pathcore.py decides with them; paths.py,
checks.py and the tests build them): what the kernel says about a peer (Seen),
what the checks heard (Heard), one peer's path (PeerPath), the schedule (Timing)
and one step's result (Decision)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from appliance.base.keys import PublicKey
from appliance.base.net import Endpoint

STEP = 0.25  # seconds between paths.py's steps
QUIET_STEP = 1.0  # ...while no peer needs them (pathcore.needs_steps)
FIRST_GAP = 0.25  # the gap after the first check of a try; doubles up to RELAYED_EVERY
RELAYED_EVERY = 2.0  # a relayed peer's candidates are checked this often: upgrade ~2 s after a path opens
# ...while it is in use (a packet from it, or a check, within ACTIVE_FOR s, or the try
# is that recent); an idle or absent peer's are checked every IDLE_EVERY only.
ACTIVE_FOR = 60.0
IDLE_EVERY = 15.0
KEEP_EVERY = 1.0  # a busy direct path's liveness check; every FIRST_GAP once an answer is late
# A direct path with no data either way for BUSY_FOR s (and proven longer ago) is idle:
# checked as often as WireGuard's keepalive goes (prefs' default), not every second.
BUSY_FOR = 10.0
IDLE_DIRECT_EVERY = 25.0
DEAD_AFTER = 2.5  # no answer nor packet from the direct path for this long: the relay takes over
TRY_EACH = 5.0  # no relay: WireGuard's REKEY_TIMEOUT per candidate
STALE_AFTER = 180.0  # WireGuard's REJECT_AFTER_TIME: an older handshake is no session
KICK_EVERY = 1.0
KICK_MAX = 8
MAX_REFLEXIVE = 4  # peer-reflexive addresses kept per peer (the latest)

Mode = Literal["trying", "direct", "relayed"]


@dataclass(frozen=True)
class Seen:
    """What the kernel says about one peer now."""

    handshake_age: float | None  # seconds since the last handshake; None: never
    endpoint: Endpoint | None
    rx: int
    tx: int


# What WireGuard sends by itself, in bytes as its counters count them (header and tag
# included): a keepalive (32), a cookie reply (64), a handshake response (92) or
# initiation (148). A counter that grew by such a sum over one read carried no data.
_BY_ITSELF = frozenset(k * 32 + r * 92 + i * 148 for k in range(4) for r in range(2) for i in range(2))


def carried_data(grew: int) -> bool:
    return grew > 0 and grew not in _BY_ITSELF


@dataclass(frozen=True)
class Heard:
    """The checks' results since the last step (paths.py, authenticated)."""

    answers: Mapping[PublicKey, tuple[Endpoint, ...]] = field(default_factory=dict)  # proven addresses
    asked: Mapping[PublicKey, tuple[Endpoint, ...]] = field(default_factory=dict)  # checks came from


@dataclass(frozen=True)
class PeerPath:
    mode: Mode
    candidates: tuple[Endpoint, ...]  # the netmap's, best first
    endpoint: Endpoint | None = None  # direct: the proven address
    since: float = 0.0  # when this mode (or this trying candidate) started
    index: int = 0  # trying: the target WireGuard is given
    heard: float = 0.0  # direct: the last proof of life
    active: float = 0.0  # the last packet or check from the peer, or the start of a try
    next_check: float = 0.0
    gap: float = FIRST_GAP
    reflexive: tuple[Endpoint, ...] = ()  # where the peer's checks came from (newest first)
    rx: int = 0
    tx: int = 0
    busy: float = float("-inf")  # direct: the last data either way, or when it was proven
    probing: float = float("inf")  # direct: the first of our checks still unanswered
    checked: float = float("-inf")  # direct: our last check went then
    shook: bool = False  # the kernel has held a handshake with it (its entry is not new)
    kicked_for: Endpoint | None = None
    kicked_at: float = 0.0
    kicks: int = 0
    repointed: float = float("-inf")
    held: Endpoint | None = None  # the kernel's endpoint at the last read

    def label(self) -> str:
        """For status: "direct <endpoint>", "relayed" or "trying"."""
        return f"direct {self.endpoint}" if self.mode == "direct" else self.mode

    def targets(self) -> tuple[Endpoint, ...]:
        return self.candidates + tuple(r for r in self.reflexive if r not in self.candidates)


@dataclass(frozen=True)
class Timing:
    first_gap: float = FIRST_GAP
    relayed_every: float = RELAYED_EVERY
    active_for: float = ACTIVE_FOR
    idle_every: float = IDLE_EVERY
    keep_every: float = KEEP_EVERY
    busy_for: float = BUSY_FOR
    idle_direct_every: float = IDLE_DIRECT_EVERY
    dead_after: float = DEAD_AFTER
    try_each: float = TRY_EACH
    stale_after: float = STALE_AFTER
    kick_every: float = KICK_EVERY
    kick_max: int = KICK_MAX


@dataclass(frozen=True)
class Decision:
    peers: Mapping[PublicKey, PeerPath]
    choices: Mapping[PublicKey, Endpoint]  # direct and trying peers: the endpoint to use
    relayed: frozenset[PublicKey]  # these get their relay proxy (paths.py)
    checks: Mapping[PublicKey, tuple[Endpoint, ...]]  # send a check to each of these now
    kicks: frozenset[PublicKey]  # start a handshake now (paths.py)
    repoint: Mapping[PublicKey, Endpoint] = field(default_factory=dict)  # WireGuard roamed off it: put back


def is_relay(endpoint: Endpoint) -> bool:
    """The relay's proxies are on loopback (relay.py); a peer never is."""
    return endpoint.host.is_loopback

"""The server's session table: what refuses replayed requests without a clock.

A `hello` makes a session bound to the caller's machine key. Every later request
names its session and carries, in its nonce, its number within the session
(1, 2, ...; wire/seal.py). A number is accepted once: the table keeps the highest
number seen and a bitmap of the WINDOW numbers below it, as WireGuard and IPsec
do (RFC 6479), so a session costs the same few hundred bytes after 10 requests
or 100,000, and requests that overtake each other (a long-poll and an update
sent from two threads) are still accepted.

Sessions end after IDLE seconds without a request, after MAX_REQUESTS requests,
and when the server restarts (the table lives in memory). The table holds at most
MAX_SESSIONS; beyond that the least recently used session goes. Anyone may say
hello (a new machine must, to register), so the cap is what bounds the memory a
stream of hellos can take: about 65,536 x 300 bytes = 20 MB. An evicted node's
next request gets `401 session` and its client says hello again.

A flood of hellos must not push out the sessions of the mesh's own nodes, so:
- one machine key holds at most MAX_PER_MACHINE sessions; its next hello ends its
  own oldest one (a node needs one, two while a long-poll and an update overlap);
- a session the server `trust`s (its machine is an approved node: app.py says so
  after a request such a node made) is evicted only when no untrusted one is left.
  Making machine keys is cheap, but approved nodes are not. Untrusted sessions
  are also capped on their own (MAX_UNTRUSTED), so such a flood takes ~1 MB.

Not thread-safe, and need not be: the server calls it from its one asyncio thread.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from appliance.wire.seal import MachinePublicKey, b64, request_number

log = logging.getLogger(__name__)

IDLE = 3600.0
MAX_REQUESTS = 100_000
MAX_SESSIONS = 65_536
MAX_PER_MACHINE = 8
# Sessions not (yet) trusted: a new machine needs one only to register, so a few
# thousand are plenty, and a flood of fresh keys costs at most ~1 MB.
MAX_UNTRUSTED = 4096
WINDOW = 1024  # how far behind the newest request an older one may still arrive
SESSION_BYTES = 16


class SessionError(Exception):
    """A request the session table refuses. `message` is safe to send."""

    status: ClassVar[int] = 401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SessionUnknown(SessionError):
    """Never made, expired, evicted, or made before a restart: say hello again."""


class WrongMachine(SessionError):
    """The session belongs to another machine key."""


class Replayed(SessionError):
    status = 409


class SessionMalformed(SessionError):
    """No session id, or no request number: a client bug, not an expiry."""

    status = 400


@dataclass(slots=True)
class _Session:
    machine: MachinePublicKey
    last_used: float
    requests: int = 0
    highest: int = 0  # the highest request number accepted
    seen: int = 0  # bit i: request number highest - i was accepted
    trusted: bool = False


class Sessions:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        idle: float = IDLE,
        max_requests: int = MAX_REQUESTS,
        max_sessions: int = MAX_SESSIONS,
        max_per_machine: int = MAX_PER_MACHINE,
        max_untrusted: int = MAX_UNTRUSTED,
    ) -> None:
        self.clock, self.idle = clock, idle
        self.max_requests, self.max_sessions = max_requests, max_sessions
        self.max_per_machine, self.max_untrusted = max_per_machine, max_untrusted
        # Least recently used first: eviction and idle expiry both take from the front.
        # Two tables: untrusted sessions go first when the cap is reached.
        self._table: OrderedDict[str, _Session] = OrderedDict()
        self._trusted: OrderedDict[str, _Session] = OrderedDict()
        # Each machine's session ids, oldest first (at most max_per_machine).
        self._by_machine: dict[MachinePublicKey, list[str]] = {}

    def __len__(self) -> int:
        return len(self._table) + len(self._trusted)

    def _drop(self, table: OrderedDict[str, _Session], session_id: str) -> _Session:
        session = table.pop(session_id)
        ids = self._by_machine[session.machine]
        ids.remove(session_id)
        if not ids:
            del self._by_machine[session.machine]
        return session

    def _find(self, session_id: str) -> tuple[OrderedDict[str, _Session], _Session] | None:
        for table in (self._trusted, self._table):
            session = table.get(session_id)
            if session is not None:
                return table, session
        return None

    def trusts(self, machine_raw: bytes) -> bool:
        """Does this machine hold a trusted session (is it an approved node)?"""
        ids = self._by_machine.get(MachinePublicKey(machine_raw), ())
        return any(session_id in self._trusted for session_id in ids)

    def trust(self, session_id: object) -> None:
        """The session's machine is an approved node: keep it over anonymous ones."""
        if not isinstance(session_id, str):
            return
        session = self._table.pop(session_id, None)
        if session is not None:
            session.trusted = True
            self._trusted[session_id] = session

    def hello(self, machine: MachinePublicKey, approved: bool = False) -> str:
        """Make a session for this machine key; returns its id (base64 of 16 random bytes).
        `approved`: the machine is an approved node (the server's copy says so): its
        session is trusted from the start. After a restart every node says hello at
        once; without this, 10,000 of them overflowed the untrusted cap and evicted
        each other's sessions before their first request."""
        now = self.clock()
        self._expire(now)
        session_id = b64(secrets.token_bytes(SESSION_BYTES))
        mine = self._by_machine.setdefault(machine, [])
        trusted = approved
        while len(mine) >= self.max_per_machine:
            # The machine's own oldest session ends, nobody else's.
            found = self._find(mine[0])
            assert found is not None
            trusted = trusted or found[1].trusted
            self._drop(found[0], mine[0])
            mine = self._by_machine.setdefault(machine, [])
        # A node that was trusted stays trusted across its own new hellos.
        (self._trusted if trusted else self._table)[session_id] = _Session(machine, now, trusted=trusted)
        mine.append(session_id)
        while len(self._table) > self.max_untrusted:
            evicted = self._drop(self._table, next(iter(self._table)))
            log.debug("untrusted sessions full: evicted the least recently used (%s)", evicted.machine)
        while len(self) > self.max_sessions:
            table = self._table if self._table else self._trusted
            evicted = self._drop(table, next(iter(table)))
            log.debug("session table full: evicted the least recently used (%s)", evicted.machine)
        return session_id

    def check(self, session_id: object, machine: MachinePublicKey, nonce: bytes) -> None:
        """Accept one request, or raise the SessionError that says why not."""
        if not isinstance(session_id, str):
            raise SessionMalformed(f"request has no session (got {session_id!r}): say hello first")
        now = self.clock()
        self._expire(now)
        found = self._find(session_id)
        if found is None:
            raise SessionUnknown("session unknown or expired: say hello again")
        table, session = found
        if session.machine != machine:
            # Not the owner's fault: leave the session as it is for its owner.
            raise WrongMachine("session belongs to another machine key: say hello")
        number = request_number(nonce)
        if number < 1:
            raise SessionMalformed(f"request number {number}: session requests count from 1")
        if number > session.highest:
            shift = number - session.highest
            # A jump past the window forgets it all (and never builds a 2**64-bit int).
            kept = session.seen << shift if shift < WINDOW else 0
            session.seen = (kept | 1) & ((1 << WINDOW) - 1)
            session.highest = number
        else:
            behind = session.highest - number
            if behind >= WINDOW:
                raise Replayed(f"request {number} is too old (newest is {session.highest})")
            if session.seen >> behind & 1:
                raise Replayed(f"request {number} of this session was already seen")
            session.seen |= 1 << behind
        session.requests += 1
        session.last_used = now
        if session.requests >= self.max_requests:
            # This request counts; the next one gets `401 session`.
            self._drop(table, session_id)
            log.debug("session of %s ended after %d requests", machine, session.requests)
        else:
            table.move_to_end(session_id)

    def _expire(self, now: float) -> None:
        """Drop idle sessions. The front is the least recently used, so this stops at
        the first live one: amortised O(1) per call."""
        for table in (self._table, self._trusted):
            while table:
                session_id, session = next(iter(table.items()))
                if now - session.last_used < self.idle:
                    break
                self._drop(table, session_id)

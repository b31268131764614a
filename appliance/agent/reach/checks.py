"""Connectivity checks, the effects (path selection's, paths.py): raw sockets at
the WireGuard port (kernel/stunport.py), checks sent to peers' candidates, the
peers' checks answered, answers to ours taken as proofs. What each datagram is
and whether it is authentic is checkcore.py's; this keeps the state around it:
our transactions awaiting an answer, the transaction ids already answered
(replays), the per-source rates, the pair keys. Every refusal is counted, and
logged once a minute per reason with its count (a flood is one line); the counts
are in status (`counters`, the LocalAPI's reach.checks) for `meshpi netcheck`.

Runs on the path chooser's thread; only `counters` is read from others (a lock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from appliance.agent.reach import checkcore
from appliance.agent.reach.pathtypes import Heard
from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.kernel.base import KernelError
from appliance.kernel.stunport import StunPort
from appliance.wire import stun

log = logging.getLogger(__name__)

PENDING_FOR = 5.0  # seconds an answer to our check is awaited
REFUSAL_LOG_EVERY = 60.0
MAX_KEYS = 4096

PortFactory = Callable[[int, int], StunPort]

# Each refusal's key in status (reach.checks.refused), by the reason the log gives.
REFUSALS = {
    "not a check": "malformed",
    "check from no peer": "unknown_peer",
    "check with a wrong HMAC": "bad_integrity",
    "check replayed": "replay",
    "checks over the rate": "over_rate",
    "answer to no check of ours": "unsolicited_answer",
    "answer from elsewhere": "answer_from_elsewhere",
    "answer with a wrong HMAC": "answer_bad_integrity",
}


@dataclass(frozen=True)
class _Pending:
    peer: PublicKey
    dest: Endpoint
    sent: float


class Checker:
    def __init__(self, own_key: Callable[[], PrivateKey], port: PortFactory = StunPort) -> None:
        """`own_key()`: this node's private key now (it changes on a rotation)."""
        self._own_key, self._make_port = own_key, port
        self.port: StunPort | None = None
        self._port_for: tuple[int, int] | None = None
        self._keys: dict[tuple[bytes, bytes], bytes] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._replay = checkcore.ReplayCache()
        self._rate = checkcore.RateLimit()
        self.refused: dict[str, int] = {}  # by the reason logged
        self._refusal_logged: dict[str, float] = {}
        self.answered = 0  # the peers' checks answered
        self.sent = 0  # our checks sent
        self.proven = 0  # authenticated answers to ours taken
        self._counting = threading.Lock()

    def open(self, listen_port: int, fwmark: int) -> None:
        """The raw sockets for this WireGuard port (again if it moved); without the
        capabilities, no checks: the relay alone carries the peers."""
        wanted = (listen_port, fwmark)
        if self._port_for == wanted:
            return
        self.close()
        self._port_for = wanted
        try:
            self.port = self._make_port(*wanted)
            log.info("paths: connectivity checks at WireGuard's port %d", listen_port)
        except KernelError as e:
            log.warning("paths: no connectivity checks (the relay only): %s", e)

    def close(self) -> None:
        if self.port is not None:
            self.port.close()
        self.port, self._port_for = None, None

    def wait(self, timeout: float) -> bool:
        """Until a datagram is there to read (True), or `timeout` seconds."""
        return self.port is not None and self.port.wait(timeout)

    def _pair_key(self, peer: PublicKey) -> bytes:
        ours = self._own_key()
        slot = (ours.public_key().raw, peer.raw)
        key = self._keys.get(slot)
        if key is None:
            if len(self._keys) > MAX_KEYS:
                self._keys.clear()
            key = self._keys[slot] = checkcore.pair_key(ours, peer)
        return key

    def send(self, me: PublicKey, checks: Mapping[PublicKey, tuple[Endpoint, ...]], now: float) -> None:
        """A check to each of these addresses of these peers (`me`: the netmap's key of this node)."""
        port = self.port
        if port is None or self._own_key().public_key() != me:
            return  # no sockets; or a rotation in flight: the peers check with the new key
        self._pending = {t: p for t, p in self._pending.items() if now - p.sent < PENDING_FOR}
        for peer, targets in checks.items():
            key = self._pair_key(peer)
            for dest in targets:
                txid = stun.new_transaction_id()
                try:
                    port.send(dest, checkcore.request(txid, me, key))
                except KernelError as e:
                    log.debug("paths: %s", e)
                    continue
                self._pending[txid] = _Pending(peer, dest, now)
                with self._counting:
                    self.sent += 1

    def read(self, peers: set[PublicKey], now: float) -> Heard:
        """What came since the last call: the peers' checks answered, our checks'
        answers taken, the rest refused (`peers`: the netmap's keys)."""
        port = self.port
        if port is None:
            return Heard()
        answers: dict[PublicKey, list[Endpoint]] = {}
        asked: dict[PublicKey, list[Endpoint]] = {}
        for datagram in port.receive():
            try:
                got = checkcore.classify(datagram.payload)
            except checkcore.ServerAnswer:
                continue  # endpoint discovery's (reach/stun.py reads it through its own socket)
            except checkcore.CheckRefused as e:
                self._refuse("not a check", f"from {datagram.source}: {e}", now)
                continue
            if got.kind == stun.BINDING_SUCCESS:
                pending = self._pending.get(got.txid)
                if pending is None:
                    self._refuse("answer to no check of ours", f"from {datagram.source}", now)
                    continue
                if pending.dest != datagram.source:
                    self._refuse(
                        "answer from elsewhere", f"from {datagram.source}, sent to {pending.dest}", now
                    )
                    continue
                if not checkcore.authentic(datagram.payload, self._pair_key(pending.peer)):
                    self._refuse("answer with a wrong HMAC", f"from {datagram.source}", now)
                    continue
                del self._pending[got.txid]
                with self._counting:
                    self.proven += 1
                answers.setdefault(pending.peer, []).append(datagram.source)
                continue
            sender = got.sender
            assert sender is not None
            if sender not in peers:
                self._refuse("check from no peer", f"from {datagram.source} as {sender.short}", now)
                continue
            key = self._pair_key(sender)
            if not checkcore.authentic(datagram.payload, key):
                self._refuse("check with a wrong HMAC", f"from {datagram.source} as {sender.short}", now)
                continue
            if not self._replay.fresh(got.txid, now):
                self._refuse("check replayed", f"from {datagram.source} as {sender.short}", now)
                continue
            if not self._rate.allow(datagram.source, now):
                self._refuse("checks over the rate", f"from {datagram.source}", now)
                continue
            reply = checkcore.answer(got.txid, datagram.source, key)
            if len(reply) <= len(datagram.payload):  # never more than we were sent
                try:
                    port.send(datagram.source, reply)
                    with self._counting:
                        self.answered += 1
                except KernelError as e:
                    log.debug("paths: %s", e)
            asked.setdefault(sender, []).append(datagram.source)
        return Heard({k: tuple(v) for k, v in answers.items()}, {k: tuple(v) for k, v in asked.items()})

    def counters(self) -> dict[str, object]:
        """For status: checks sent, answers taken, checks answered, refusals by key
        (every key, 0 included, so a reader sees what is counted)."""
        with self._counting:
            refused = {key: self.refused.get(reason, 0) for reason, key in REFUSALS.items()}
            return {"sent": self.sent, "proven": self.proven, "answered": self.answered, "refused": refused}

    def _refuse(self, reason: str, detail: str, now: float) -> None:
        with self._counting:
            count = self.refused[reason] = self.refused.get(reason, 0) + 1
        last = self._refusal_logged.get(reason)
        if last is None or now - last >= REFUSAL_LOG_EVERY:
            self._refusal_logged[reason] = now
            log.warning("paths: refused (%s, %d so far): %s", reason, count, detail)

"""Hostile datagrams at the WireGuard port, where the agent answers its peers'
connectivity checks (appliance/agent/reach/paths.py, checkcore.py): node a is
behind a "cone" NAT, so anyone on the internet reaches its WireGuard port. From
there an attacker sends garbage, STUN without integrity, checks signed with a
wrong key, a genuine check (as if captured on the path) and its replays, and a
flood. Only the genuine check is answered, once, with no more bytes than it
had; each refusal is counted in the LocalAPI's status (reach.checks.refused) and
logged once per reason; the pair's direct path and its pings are untouched."""

from __future__ import annotations

import os
import sys
import time

import pytest

from appliance.agent.reach import checkcore
from appliance.agent.statedir import StateDir
from appliance.base.keys import PrivateKey
from appliance.wire import stun
from tests.lab.host import wait_for
from tests.lab.nat_lab import WAN, WG_PORT, NatLab
from tests.lab.nat_mesh import MeshNode, nat_mesh

pytestmark = pytest.mark.netns

ATTACKER_PORT = 40404
_LISTEN = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
payloads = [bytes.fromhex(x) for x in sys.stdin.read().split()]
for p in payloads:
    s.sendto(p, (sys.argv[3], int(sys.argv[4])))
got, size = 0, 0
try:
    while True:
        data, _ = s.recvfrom(65535)
        got, size = got + 1, max(size, len(data))
except TimeoutError:
    pass
print(got, size)
"""


def _send(lab: NatLab, payloads: list[bytes], wait: float = 2.0) -> tuple[int, int]:
    """From the internet namespace's UDP port ATTACKER_PORT to a's public WireGuard
    port; (answers received, the biggest answer)."""
    res = lab.internet.run(
        [sys.executable, "-c", _LISTEN, str(ATTACKER_PORT), str(wait), WAN["a"], str(WG_PORT)],
        input=" ".join(p.hex() for p in payloads),
        timeout=120,
    )
    got, size = res.stdout.split()
    return int(got), int(size)


def _counters(node: MeshNode) -> dict[str, object]:
    checks: dict[str, object] = node.status()["reach"]["checks"]
    return checks


def _refused(node: MeshNode) -> dict[str, int]:
    return dict(_counters(node)["refused"])  # type: ignore[call-overload]


def _wait_refused(node: MeshNode, before: dict[str, int], want: dict[str, int]) -> dict[str, int]:
    """Until the refusals grew by `want` (the paths thread reads them as they come);
    the refusals' growth then, every key."""

    def grown() -> dict[str, int] | None:
        now = _refused(node)
        delta = {k: now[k] - before[k] for k in now}
        return delta if all(delta[k] >= n for k, n in want.items()) else None

    got: dict[str, int] = wait_for(grown, 30, f"refusals {want}", interval=0.5)  # type: ignore[assignment]
    return got


def test_paths_checks_hostile_datagrams_are_refused_unanswered() -> None:
    with nat_mesh("cone", "restricted") as mesh:
        mesh.first_packet(timeout=30)
        mesh.wait_path("direct", 15)
        a_pub = StateDir(mesh.a.state).node_key().public_key()
        b_key = StateDir(mesh.b.state).node_key()
        key = checkcore.pair_key(b_key, a_pub)  # what b signs its checks to a with (stolen here)

        garbage = [os.urandom(n) for n in (0, 3, 20, 200, 1400)]
        garbage.append(stun.binding_request(os.urandom(12), "evil", 64))  # no integrity
        garbage.append(os.urandom(4) + (stun.MAGIC_COOKIE).to_bytes(4, "big") + os.urandom(100))
        wrong = [checkcore.request(os.urandom(12), b_key.public_key(), os.urandom(32)) for _ in range(20)]
        stranger = [checkcore.request(os.urandom(12), PrivateKey.generate().public_key(), key)]
        path_before = mesh.a.path()
        before = _refused(mesh.a)
        assert set(before) >= {"malformed", "unknown_peer", "bad_integrity", "replay", "over_rate"}
        assert _send(mesh.lab, garbage + wrong + stranger) == (0, 0)
        # Garbage without STUN's magic cookie never leaves the kernel (the port's BPF
        # filter); the two STUN-looking ones are counted as malformed.
        delta = _wait_refused(mesh.a, before, {"malformed": 2, "bad_integrity": 20, "unknown_peer": 1})
        assert (delta["malformed"], delta["bad_integrity"], delta["unknown_peer"]) == (2, 20, 1), delta
        assert delta["replay"] == 0 and delta["over_rate"] == 0, delta

        answered: int = _counters(mesh.a)["answered"]  # type: ignore[assignment]
        genuine = checkcore.request(stun.new_transaction_id(), b_key.public_key(), key)
        got, size = _send(mesh.lab, [genuine])
        assert got == 1 and 0 < size <= len(genuine)
        assert _counters(mesh.a)["answered"] >= answered + 1  # type: ignore[operator]  (b's count too)
        before = _refused(mesh.a)
        assert _send(mesh.lab, [genuine] * 20) == (0, 0)  # replays
        assert _wait_refused(mesh.a, before, {"replay": 20})["replay"] == 20

        flood = [checkcore.request(os.urandom(12), b_key.public_key(), os.urandom(32)) for _ in range(3000)]
        started = time.monotonic()
        assert _send(mesh.lab, flood + garbage * 100, wait=1.0) == (0, 0)
        print(f"flood of {len(flood) + len(garbage) * 100} sent in {time.monotonic() - started:.1f}s")

        # Counted (as far as the socket's buffer held them), none answered.
        assert _wait_refused(mesh.a, before, {"bad_integrity": 1})["bad_integrity"] <= len(flood)
        after = _counters(mesh.a)
        print(f"flood counted: {after['refused']}")

        # The pair is untouched: the same direct path, pings flow both ways, nothing lost.
        assert path_before is not None and path_before.startswith("direct")
        assert mesh.a.path() == path_before
        for src, dst in ((mesh.a, mesh.b), (mesh.b, mesh.a)):
            sent, received = src.host.ping(dst.mesh_v4(), count=10, interval=0.1)
            assert received == sent
        log = (mesh.lab.scratch / "nodea-agent.log").read_text()
        for reason in ("not a check", "check with a wrong HMAC", "check from no peer", "check replayed"):
            assert log.count(f"refused ({reason},") == 1, reason
        assert mesh.a.proc.poll() is None

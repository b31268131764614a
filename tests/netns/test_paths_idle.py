"""An idle direct path (appliance/agent/reach/pathcore.py): two agents behind
port-restricted NATs, direct, then nothing through the tunnel but WireGuard's own
keepalives. Idle, each side checks the path about every 25 s, not every second
(the checks' counters in the LocalAPI's status say how many went). Cut while idle,
the first packet sent wakes the checks at once: the relay carries the pings within
seconds, not after the next 25 s check; healed, the pair is direct again."""

from __future__ import annotations

import time

import pytest

from appliance.agent.reach.pathtypes import BUSY_FOR, IDLE_DIRECT_EVERY
from tests.lab.nat_mesh import MeshNode, NatMesh, nat_mesh

pytestmark = pytest.mark.netns

WATCH = 30.0  # seconds the idle pair is watched: at most two idle checks per side


def _sent(node: MeshNode) -> int:
    return int(node.status()["reach"]["checks"]["sent"])


def _answered_after(mesh: NatMesh, timeout: float = 60.0) -> float:
    """Seconds until a ping a -> b is answered (one every 50 ms until then)."""
    started = time.monotonic()
    cmd = ["ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", str(int(timeout)), mesh.b.mesh_v4()]
    res = mesh.a.host.run(cmd, check=False, timeout=timeout + 10)
    assert res.returncode == 0, f"no answer a -> b within {timeout:g}s: {res.stdout}"
    return time.monotonic() - started


def test_paths_idle_direct_path_is_checked_seldom_and_wakes_at_the_first_packet() -> None:
    with nat_mesh("restricted", "restricted") as mesh:
        mesh.first_packet(timeout=60)
        mesh.wait_path("direct", 60)
        # Idle from here: the first ping, and the path's proof, are BUSY_FOR s behind.
        # (A span of time is what is measured: no event to await instead.)
        time.sleep(BUSY_FOR + 2)
        before = (_sent(mesh.a), _sent(mesh.b))
        time.sleep(WATCH)
        sent = (_sent(mesh.a) - before[0], _sent(mesh.b) - before[1])
        assert all((p or "").startswith("direct") for p in (mesh.a.path(), mesh.b.path()))
        # Busy, each side would have sent ~WATCH checks; idle, one per IDLE_DIRECT_EVERY
        # (and a few retries of one that went unanswered on a loaded machine).
        most = int(WATCH / IDLE_DIRECT_EVERY) + 1 + 4
        assert all(n <= most for n in sent), (sent, most)

        mesh.lab.block_direct()
        took = _answered_after(mesh)
        print(f"idle: checks sent in {WATCH:g}s {sent}; cut, then answered through the relay in {took:.2f}s")
        # Expected ~2 s (a check at once, DEAD_AFTER - KEEP_EVERY unanswered); generous
        # for a loaded machine, and well below waiting for the next idle check.
        assert took <= IDLE_DIRECT_EVERY - 5, took
        mesh.wait_path("relayed", 30)
        mesh.lab.unblock_direct()
        mesh.wait_path("direct", 60)
        sent_pings, received = mesh.a.host.ping(mesh.b.mesh_v4(), count=5, interval=0.2)
        assert received == sent_pings

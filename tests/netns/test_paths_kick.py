"""The "kick" (appliance/agent/reach/paths.py): a WireGuard peer with no session is
removed and added again, and sent a packet, so WireGuard initiates a handshake now
instead of after its 5 s rate limit. Two agents behind port-restricted NATs, relayed
(the direct path cut); node a's WireGuard peer for b is removed and re-added (`wg`,
then SIGHUP: the agent's resync puts it back) while b's agent is stopped, so no
session can come: a's agent kicks the new entry, though it had kicked that proxy
endpoint before. Once b runs again and the cut heals, the pair is direct again.
The image tier does the same beside kernel WireGuard (tests/image/test_reach_paths.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from appliance.agent.statedir import StateDir
from tests.lab.host import wait_for
from tests.lab.nat_mesh import MeshNode, nat_mesh

pytestmark = pytest.mark.netns


def _kicks(node: MeshNode, short: str) -> int:
    log = (node.state.parent / f"{node.name}-agent.log").read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "handshake restarted with" in line and short in line)


def test_paths_kick_restarts_the_handshake_of_a_readded_peer() -> None:
    with nat_mesh("restricted", "restricted") as mesh:
        mesh.first_packet(timeout=60)
        mesh.wait_path("direct", 60)
        mesh.lab.block_direct()
        mesh.wait_path("relayed", 60)
        b_key = str(StateDir(mesh.b.state).node_key().public_key())
        before = _kicks(mesh.a, b_key[:8])
        os.kill(mesh.b.proc.pid, signal.SIGSTOP)  # its relay proxy too: no session can come
        try:
            mesh.a.host.run(["wg", "set", mesh.a.interface, "peer", b_key, "remove"])
            os.kill(mesh.a.proc.pid, signal.SIGHUP)  # resync: the peer is put back, sessionless
            wait_for(lambda: _kicks(mesh.a, b_key[:8]) > before, 30, "a's agent to kick the re-added peer",
                     interval=0.5)  # fmt: skip
        finally:
            os.kill(mesh.b.proc.pid, signal.SIGCONT)
        healed = time.time()
        mesh.lab.unblock_direct()
        mesh.wait_path("direct", 60)
        # Proven direct by the checks; the session comes with the kick's handshake. (A
        # packet sent in the instant of a kick is lost with the peer entry it waited in.)
        wait_for(
            lambda: ((mesh.a.peer() or {}).get("last_handshake") or 0) > healed, 30, "a's session with b"
        )
        sent, received = mesh.a.host.ping(mesh.b.mesh_v4(), count=5, interval=0.2)
        assert received == sent
        assert mesh.a.proc.poll() is None and mesh.b.proc.poll() is None

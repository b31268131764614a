"""Path selection end to end (appliance/agent/reach/paths.py): two meshpi agents in
control mode, each behind a NAT of a kind built with nftables (tests/lab/nat_lab.py:
cone, restricted, symmetric, noudp), control with its relay and STUN server in
between, wireguard-go. Every pair of kinds reaches the path it can (direct by
hole punching, else the relay), pings flow, and the time to the first answered
ping is recorded (pytest's record_property, and printed). A direct path that is
cut falls back to the relay within seconds and comes back when the cut heals.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.host import wait_for
from tests.lab.nat_mesh import UPGRADE_EVERY, NatMesh, nat_mesh

pytestmark = pytest.mark.netns

# What each pair can do: a cone accepts anyone on its mapping; two port-restricted
# NATs punch; a symmetric NAT's port for the peer is unknown to a restricted one;
# no UDP, no direct path at all.
EXPECTED = {
    ("cone", "cone"): "direct",
    ("cone", "restricted"): "direct",
    ("cone", "symmetric"): "direct",
    ("restricted", "restricted"): "direct",
    ("restricted", "symmetric"): "relayed",
    ("symmetric", "symmetric"): "relayed",
    ("noudp", "cone"): "relayed",
    ("noudp", "restricted"): "relayed",
    ("noudp", "symmetric"): "relayed",
    ("noudp", "noudp"): "relayed",
}
SETTLE = 60.0  # trying windows, plus the first background try of direct


@pytest.mark.parametrize(("kind_a", "kind_b"), list(EXPECTED), ids=[f"{a}-{b}" for a, b in EXPECTED])
def test_paths_nat_pair_reaches_its_path(
    kind_a: str, kind_b: str, record_property: pytest.RecordProperty
) -> None:
    expected = EXPECTED[(kind_a, kind_b)]
    with nat_mesh(kind_a, kind_b) as mesh:
        first = mesh.first_packet(timeout=40)
        record_property("first_packet_s", round(first, 2))
        print(f"{kind_a}-{kind_b}: first packet after {first:.2f}s")
        paths = mesh.wait_path(expected, SETTLE)
        record_property("paths", paths)
        # Both ways, through whatever path was reached. A relayed pair loses what
        # is sent during a background try of direct (up to ~4 s at each slot): a
        # burst that falls into one is tried again.
        for src, dst in ((mesh.a, mesh.b), (mesh.b, mesh.a)):
            for _ in range(3):
                sent, received = src.host.ping(dst.mesh_v4(), count=10, interval=0.1)
                if received >= 9:
                    break
                time.sleep(2)
            assert received >= 9, f"{src.name} -> {dst.name}: {received}/{sent} over {paths}"
        for node in (mesh.a, mesh.b):
            peer = node.peer()
            assert peer is not None and peer["direct"] is (expected == "direct"), peer
            # relayed: WireGuard sends to the relay's local proxy
            assert peer["endpoint"].startswith("127.0.0.1:") is (expected == "relayed"), peer


class Pinger:
    """`ping -D -O` a -> b every 0.1 s in the background; which sequence numbers came back."""

    INTERVAL = 0.1

    def __init__(self, mesh: NatMesh) -> None:
        self.log = mesh.lab.scratch / "failover-ping.log"
        self.started = time.monotonic()
        self.proc = mesh.a.host.popen(
            ["ping", "-n", "-D", "-O", "-i", str(self.INTERVAL), "-W", "1", mesh.b.mesh_v4()], log=self.log
        )

    def stop(self) -> tuple[int, list[float]]:
        """(sent, the send times of the lost pings, seconds since start)."""
        self.proc.terminate()
        self.proc.wait(5)
        text = self.log.read_text()
        answered = {int(m) for m in re.findall(r"bytes from .*icmp_seq=(\d+)", text)}
        sent = max([int(m) for m in re.findall(r"icmp_seq=(\d+)", text)], default=0)
        lost = [seq * self.INTERVAL for seq in range(1, sent - 10) if seq not in answered]
        return sent, lost


def test_paths_nat_direct_cut_falls_back_to_the_relay_and_heals(
    record_property: pytest.RecordProperty,
) -> None:
    with nat_mesh("restricted", "restricted") as mesh:
        mesh.first_packet(timeout=40)
        mesh.wait_path("direct", SETTLE)
        pinger = Pinger(mesh)
        try:
            time.sleep(2)  # a stretch of answered pings before the cut
            cut = time.monotonic() - pinger.started
            mesh.lab.block_direct()
            mesh.wait_path("relayed", 20)
            relayed = time.monotonic() - pinger.started
            # Pings flow through the relay again.
            wait_for(
                lambda: mesh.a.host.ping(mesh.b.mesh_v4(), count=1)[1] == 1, 10, "pings through the relay"
            )
            flowing = time.monotonic() - pinger.started
            mesh.lab.unblock_direct()
            healed_from = time.monotonic() - pinger.started
            mesh.wait_path("direct", 4 * float(UPGRADE_EVERY) + 15)
            direct = time.monotonic() - pinger.started
            time.sleep(3)
        finally:
            sent, lost = pinger.stop()
        record_property("relayed_after_cut_s", round(relayed - cut, 2))
        record_property("direct_after_heal_s", round(direct - healed_from, 2))
        print(f"cut at {cut:.1f}s: relayed after {relayed - cut:.1f}s, pings again at {flowing - cut:.1f}s; "
              f"healed at {healed_from:.1f}s: direct after {direct - healed_from:.1f}s; "
              f"lost {len(lost)} of {sent}: {lost}")  # fmt: skip
        assert relayed - cut <= 5 + 2 + 5, (
            "the relay takes over within 5 s of death (+ a tick, + a handshake)"
        )
        # Nothing lost outside the cut's window and the one try of direct after the heal.
        outside = [t for t in lost if not (cut - 0.5 <= t <= flowing + 0.5 or healed_from <= t <= direct + 1)]
        assert not outside, (outside, lost)
        assert len([t for t in lost if t >= healed_from]) * Pinger.INTERVAL <= 7.0, lost

"""Path selection end to end (appliance/agent/reach/paths.py): two meshpi agents in
control mode, each behind a NAT of a kind built with nftables (tests/lab/nat_lab.py:
cone, restricted, symmetric, noudp), control with its relay and STUN server in
between, wireguard-go. Every pair of kinds reaches the path it can (direct by
connectivity checks from the WireGuard port, else the relay, which carries the
pair from the start), pings flow, and the time to the first answered ping is
recorded (pytest's record_property, and printed) and held to the goals of issue
10: direct pairs within 1 s, relayed ones within 2 s (CI_SLACK for a loaded
machine). A direct path that is cut falls back to the relay within 5 s and
comes back within 5 s of the heal; the pings lose nothing outside those windows.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.nat_mesh import NatMesh, nat_mesh

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
SETTLE = 15.0  # a direct path is proven within a couple of seconds, or never
GOAL = {"direct": 1.0, "relayed": 2.0}  # seconds to the first packet (issue 10)
CI_SLACK = 1.5  # 2 cores shared by every test and build here


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
        assert first <= GOAL[expected] * CI_SLACK, (
            f"first packet after {first:.2f}s ({expected}); each saw the other after {mesh.saw_each_other_s:.2f}s"
        )
        if expected == "relayed":
            time.sleep(3)  # the checks go on in the background: they must cost no traffic
        # Both ways, through whatever path was reached: nothing lost.
        for src, dst in ((mesh.a, mesh.b), (mesh.b, mesh.a)):
            sent, received = src.host.ping(dst.mesh_v4(), count=20, interval=0.1)
            assert received == sent, f"{src.name} -> {dst.name}: {received}/{sent} over {paths}"
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
            mesh.wait_path("relayed", 10)
            relayed = time.monotonic() - pinger.started
            time.sleep(4)  # relayed for a while: the background checks cost nothing
            healed_from = time.monotonic() - pinger.started
            mesh.lab.unblock_direct()
            mesh.wait_path("direct", 10)
            direct = time.monotonic() - pinger.started
            time.sleep(3)
        finally:
            sent, lost = pinger.stop()
        record_property("failover_s", round(relayed - cut, 2))
        record_property("upgrade_s", round(direct - healed_from, 2))
        print(f"cut at {cut:.1f}s: relayed after {relayed - cut:.1f}s; "
              f"healed at {healed_from:.1f}s: direct after {direct - healed_from:.1f}s; "
              f"lost {len(lost)} of {sent}: {lost}")  # fmt: skip
        assert relayed - cut <= 5.0, "the relay takes over within 5 s of the cut"
        assert direct - healed_from <= 5.0, "direct again within 5 s of the heal"
        # Nothing lost outside the 5 s after the cut (a ping's 1 s wait included),
        # nothing at all while relayed, trying direct, or switching back.
        outside = [t for t in lost if not cut - 0.3 <= t <= cut + 5.0]
        assert not outside, (outside, lost)

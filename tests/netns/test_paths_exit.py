"""Issue 10's "done when": a laptop behind a carrier-grade (symmetric) NAT and a Pi behind
a home NAT, with no port forward and no --advertise-endpoint, reach each other and the
laptop sends its traffic out through the Pi as its exit node: directly when the NATs
allow it, through control's relay when they do not (tests/lab/nat_lab.py's NATs,
two meshpi agents on wireguard-go, a real control with its relay and STUN server).

What the internet's server sees is the proof: the Pi's home WAN address (its router
masquerades the Pi's exit traffic), never the laptop's own.
"""

from __future__ import annotations

import pytest

from tests.lab.host import LabError, wait_for
from tests.lab.nat_lab import INET_B, WAN
from tests.lab.nat_mesh import BIN, nat_mesh

pytestmark = pytest.mark.netns

PORT = 8090  # the whoami server on the internet (control has 8080)


@pytest.mark.parametrize(
    ("home", "away", "path"),
    [("restricted", "restricted", "direct"), ("restricted", "symmetric", "relayed")],
    ids=["home-restricted-laptop-restricted", "home-restricted-laptop-symmetric"],
)
def test_paths_exit_laptop_goes_out_through_the_pi(home: str, away: str, path: str) -> None:
    with nat_mesh(home, away) as mesh:
        pi, laptop, lab = mesh.a, mesh.b, mesh.lab
        server = lab.internet.whoami_server(PORT)
        try:

            def seen() -> str | None:
                try:
                    return laptop.host.fetch(INET_B, port=PORT, timeout=2).strip()
                except LabError:
                    return None

            assert seen() == WAN["b"]  # before: the laptop's own NAT
            pi.meshpi("set", "--advertise-exit-node")
            admin = [str(BIN / "meshpi-control"), "--state-dir", str(lab.scratch / "control")]
            listed = lab.internet.run([*admin, "nodes", "list"]).stdout.splitlines()[1:]
            (pi_id,) = [line.split()[0] for line in listed if line.split()[1] == pi.name]
            lab.internet.run([*admin, "routes", "approve", pi_id, "0.0.0.0/0", "::/0"])
            wait_for(
                lambda: any(p.get("exit_node") for p in laptop.status()["peers"]),
                20,
                "the offer at the laptop",
            )
            laptop.meshpi("set", "--exit-node", pi.name)
            wait_for(lambda: seen() == WAN["a"], 30, "the laptop's traffic out through the pi's home")
            mesh.wait_path(path, 15)  # both sides on the path these NATs allow
            for _ in range(5):  # and it stays there
                assert seen() == WAN["a"]
        finally:
            server.stop()

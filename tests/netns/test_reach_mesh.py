"""Reachability end to end: a pi behind a home router with NO port forward and no
--advertise-endpoint joins a mesh; the agent maps its WireGuard port on the router
(miniupnpd: PCP, NAT-PMP, UPnP-IGD), learns its public address by STUN from the
WireGuard port (control's STUN server), tells control, and a laptop on the
internet reaches it through the mapping. Logging out removes the mapping.

    inet 5.5.5.254: meshpi-control (:8080, STUN :3478), the laptop's agent
      |
    router 5.5.5.1 (miniupnpd; masquerade; no port forward)
      |
    pi 192.168.77.2: meshpi agent, WireGuard on 51820
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator

import pytest
from nacl.public import PrivateKey

from appliance.wire.loginurl import login_url
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.portmap_lab import INET_V4, WAN_V4, Miniupnpd, PortmapLab

pytestmark = pytest.mark.netns
BIN = REPO_ROOT / ".venv" / "bin"
CONTROL = f"http://{INET_V4}:8080"


class Agent:
    def __init__(self, lab: PortmapLab, host: Host, name: str, interface: str) -> None:
        self.host, self.name, self.interface = host, name, interface
        self.state = lab.scratch / name
        self.sock = self.state / "local.sock"
        self.proc = host.popen([str(BIN / "meshpi"), "agent", "--state-dir", str(self.state),
                                "--local-api", str(self.sock)], log=lab.scratch / f"{name}-agent.log")  # fmt: skip
        wait_for(lambda: self.sock.exists(), 10, f"{name}'s agent")

    def meshpi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "meshpi"), *args, "--state-dir", str(self.state), "--local-api", str(self.sock)]
        return self.host.run(cmd, check=check)

    def status(self) -> dict[str, object]:
        return json.loads(self.meshpi("status", "--json").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def world() -> Iterator[tuple[PortmapLab, Miniupnpd, Agent, Agent]]:
    with PortmapLab() as lab:
        upnpd = Miniupnpd(lab).start()
        state = lab.scratch / "control"
        control = lab.internet.popen([str(BIN / "meshpi-control"), "--state-dir", str(state), "serve",
                                      "--listen", f"{INET_V4}:8080"], log=lab.scratch / "control.log")  # fmt: skip
        wait_for(
            lambda: lab.internet.run(["ss", "-ltn", "sport = :8080"]).stdout.count("LISTEN"), 10, "control"
        )
        pub = PrivateKey(base64.b64decode((state / "control.key").read_text().strip())).public_key
        login = login_url(CONTROL, pub)
        admin = [str(BIN / "meshpi-control"), "--state-dir", str(state)]
        # The admin API listens on loopback only; the CLI finds it in the state dir.
        auth = lab.internet.run([*admin, "keys", "create", "--reusable", "--expires", "600"]).stdout.strip()
        pi = Agent(lab, lab.pi, "pi", "mprp0")
        laptop = Agent(lab, lab.internet, "laptop", "mprl0")
        try:
            for node, port in ((pi, "51820"), (laptop, "51821")):
                res = node.meshpi(
                    "up",
                    "--login-server",
                    login,
                    "--auth-key",
                    auth,
                    "--hostname",
                    node.name,
                    "--backend",
                    "userspace",
                    "--interface",
                    node.interface,
                    "--listen-port",
                    port,
                )
                assert res.stdout.startswith("connected"), res.stdout + res.stderr
            yield lab, upnpd, pi, laptop
        finally:
            for node in (pi, laptop):
                node.meshpi("down", check=False)
            lab.stop_process(control)


def _pi_endpoint_at(laptop: Agent) -> str | None:
    peers = laptop.status()["peers"]
    pi = next((p for p in peers if p["name"] == "pi"), None)  # type: ignore[union-attr, index]
    return None if pi is None else pi["endpoint"]  # type: ignore[index, no-any-return]


def test_reach_pi_behind_nat_without_port_forward_is_reached_through_its_mapping(
    world: tuple[PortmapLab, Miniupnpd, Agent, Agent],
) -> None:
    lab, upnpd, pi, laptop = world
    mapped = f"{WAN_V4}:51820"
    # The pi maps its WireGuard port and announces it first; STUN agrees on the address.
    wait_for(lambda: pi.status()["reach"]["port_mapping"]["external"] == mapped, 20, "the pi's mapping")  # type: ignore[index]
    reach = pi.status()["reach"]
    assert reach["endpoints"][0] == mapped, reach  # type: ignore[index]
    wait_for(lambda: (pi.status()["reach"]["stun"] or {}).get("ipv4", "").startswith(WAN_V4), 40, "STUN")  # type: ignore[union-attr, index]
    assert any("51820" in line for line in upnpd.redirects()), upnpd.redirects()
    # The laptop hears it from control and reaches the pi directly through the mapping.
    wait_for(lambda: _pi_endpoint_at(laptop) == mapped, 10, "the laptop to learn the pi's endpoint")
    pi_mesh = pi.status()["self"]["addresses"][0]  # type: ignore[index]
    wait_for(lambda: laptop.host.ping(pi_mesh, count=1)[1] == 1, 20, "laptop -> pi through the mapping")
    assert "local network wins" not in pi.meshpi("status").stdout
    assert f"endpoints: {mapped}" in pi.meshpi("status").stdout
    check = json.loads(pi.meshpi("netcheck", "--json").stdout)
    assert check["reachable"] and check["mapped"] == mapped and check["udp"], check
    assert check["ipv4"].startswith(WAN_V4) and not check["cgnat"], check
    assert check["relay_ms"] is not None and 0 < check["relay_ms"] < 2000, check  # a ping to control's relay
    text = pi.meshpi("netcheck").stdout
    assert "reachable from outside: yes" in text and " ms round trip" in text

    # Logging out removes the mapping from the router.
    pi.meshpi("logout")
    wait_for(lambda: not upnpd.redirects(), 10, "the mapping to be removed")

"""A mesh that forms itself: meshpi-control in the lab's "internet" namespace,
agents in control mode on the pi and two laptops, joined with `meshpi up`.

    control 203.0.113.10:8080 (in inet)
    pi       home LAN, port forward 198.51.100.1:51820, offers exit + 192.168.77.0/24
    laptop   behind its router's NAT, uses the pi as exit node
    laptop2  behind the same NAT; removed by the admin in one test

One mesh serves the module; tests that change it put it back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.host import REPO_ROOT, Host, LabError, wait_for
from tests.lab.topology import HOME_WAN_V4, LANHOST_V4, PI_V4, SERVER_V4, Lab

CONTROL = f"http://{SERVER_V4}:8443"
BIN = REPO_ROOT / ".venv" / "bin"


@dataclass
class Node:
    name: str
    host: Host
    state: Path
    interface: str

    def meshpi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run([str(BIN / "meshpi"), *args, "--state-dir", str(self.state)], check=check)

    def status(self) -> dict[str, object]:
        return json.loads(self.meshpi("status", "--json").stdout)  # type: ignore[no-any-return]

    def mesh_v4(self) -> str:
        return str(self.status()["self"]["addresses"][0])  # type: ignore[index]

    def peers_in_kernel(self) -> str:
        return self.host.run(["wg", "show", self.interface, "allowed-ips"]).stdout


@dataclass
class World:
    lab: Lab
    nodes: dict[str, Node]
    control: subprocess.Popen[bytes]
    control_state: Path
    login: str

    def admin(self, *args: str) -> str:
        cmd = [
            str(BIN / "meshpi-control"),
            "--state-dir",
            str(self.control_state),
            *args,
            "--server",
            CONTROL,
        ]
        return self.lab.internet.run(cmd).stdout

    def node_id(self, name: str) -> int:
        for line in self.admin("nodes", "list").splitlines()[1:]:
            fields = line.split()
            if fields[1] == name:
                return int(fields[0])
        raise AssertionError(f"no node {name}")


def _start_control(lab: Lab, state: Path) -> subprocess.Popen[bytes]:
    proc = lab.internet.popen(
        [str(BIN / "meshpi-control"), "--state-dir", str(state), "serve", "--listen", f"{SERVER_V4}:8443"],
        log=lab.scratch / "control.log",
    )
    wait_for(lambda: lab.internet.run(["ss", "-ltn", "sport = :8443"]).stdout.count("LISTEN"), 10, "control")
    return proc


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab(laptop2=True) as lab:
        control_state = lab.scratch / "control"
        control = _start_control(lab, control_state)
        key = (control_state / "control.key").read_text().strip()
        import base64

        from nacl.public import PrivateKey

        from appliance.wire.seal import login_url

        pub = PrivateKey(base64.b64decode(key)).public_key
        login = login_url(CONTROL, pub)
        tag = f"mp{os.getpid() % 10000}c"
        hosts = {"pi": lab.pi, "laptop": lab.laptop, "laptop2": lab.laptop2}
        nodes = {
            name: Node(name, host, lab.scratch / name, f"{tag}{i}")  # type: ignore[arg-type]
            for i, (name, host) in enumerate(hosts.items())
        }
        world = World(lab, nodes, control, control_state, login)
        auth = world.admin("keys", "create", "--reusable", "--expires", "600").strip()
        for node in nodes.values():
            node.host.popen([str(BIN / "meshpi"), "agent", "--state-dir", str(node.state)],
                            log=lab.scratch / f"{node.name}-agent.log")  # fmt: skip
        extra = {
            "pi": ["--advertise-exit-node", "--advertise-routes", "192.168.77.0/24",
                   "--advertise-endpoint", f"{HOME_WAN_V4}:51820"],
            "laptop": ["--listen-port", "51821"],
            "laptop2": ["--listen-port", "51822"],
        }  # fmt: skip
        for node in nodes.values():
            wait_for(lambda n=node: (n.state / "agent.pid").exists(), 10, f"{node.name} agent")
            res = node.meshpi("up", "--login-server", login, "--auth-key", auth, "--hostname", node.name,
                              "--backend", "userspace", "--interface", node.interface, *extra[node.name])  # fmt: skip
            assert res.stdout.startswith("connected"), res.stdout + res.stderr
        try:
            yield world
        finally:
            for node in nodes.values():
                node.meshpi("down", check=False)


def _within(seconds: float, what: str, check: Callable[[], bool]) -> float:
    start = time.monotonic()
    wait_for(check, seconds, what, interval=0.05)
    return time.monotonic() - start


def _reaches(host: Host, dst: str) -> bool:
    try:
        host.fetch(dst, timeout=1)
    except LabError:
        return False
    return True


def test_mesh_nodes_join_and_ping_each_other(world: World) -> None:
    pi, laptop, laptop2 = (world.nodes[n] for n in ("pi", "laptop", "laptop2"))
    assert {laptop.mesh_v4(), laptop2.mesh_v4(), pi.mesh_v4()} == {"100.64.0.1", "100.64.0.2", "100.64.0.3"}
    # The laptops are behind one NAT and reach each other through nothing yet: both
    # reach the pi, whose endpoint (a port forward) is known.
    for node in (laptop, laptop2):
        wait_for(lambda n=node: n.host.ping(pi.mesh_v4(), count=1)[1] == 1, 10, f"{node.name} -> pi")
        sent, received = node.host.ping(pi.mesh_v4(), count=3, interval=0.2)
        assert received == sent
        sent, received = pi.host.ping(node.mesh_v4(), count=3, interval=0.2)
        assert received == sent


def test_mesh_route_approval_takes_effect_within_2s_and_exit_works(world: World) -> None:
    lab, laptop = world.lab, world.nodes["laptop"]
    lab.lanhost.whoami_server()
    assert not _reaches(lab.laptop, LANHOST_V4)  # advertised, not approved: no route
    pi_id = world.node_id("pi")
    world.admin("routes", "approve", str(pi_id), "192.168.77.0/24", "0.0.0.0/0", "::/0")
    took = _within(2.0, "the approved LAN route", lambda: _reaches(lab.laptop, LANHOST_V4))
    assert took <= 2.0
    assert lab.laptop.fetch(LANHOST_V4) == PI_V4
    # Now the pi offers an approved exit: the laptop chooses it.
    lab.internet.whoami_server()
    laptop.meshpi("set", "--exit-node", "pi")
    wait_for(lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4, 5, "exit via the pi")
    laptop.meshpi("set", "--exit-node", "")
    wait_for(lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == "192.0.2.1", 5, "direct again")


def test_mesh_control_outage_loses_nothing_and_reconnects(world: World) -> None:
    lab, pi = world.lab, world.nodes["pi"]
    lab.stop_process(world.control)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", lab.laptop.ns, "ping", "-n", "-q", "-c", "300", "-i", "0.2", pi.mesh_v4()],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, _ = ping.communicate(timeout=90)  # control stays down for the 60 s of pings
    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+)", out).groups())  # type: ignore[union-attr]
    assert sent == 300 and received == 300, out
    world.control = _start_control(lab, world.control_state)
    restarted = time.monotonic()
    for node in world.nodes.values():
        status_file = node.state / "control-status.json"
        wait_for(
            lambda f=status_file: json.loads(f.read_text())["state"] == "connected"
            and f.stat().st_mtime > time.time() - (time.monotonic() - restarted) - 0.5,
            5, f"{node.name} to reconnect",
        )  # fmt: skip
    assert time.monotonic() - restarted <= 5


def test_mesh_removed_node_is_dropped_by_peers_within_2s(world: World) -> None:
    pi, laptop2 = world.nodes["pi"], world.nodes["laptop2"]
    key = laptop2.host.run([str(BIN / "meshpi"), "key", "--state-dir", str(laptop2.state)]).stdout.strip()
    assert key in pi.peers_in_kernel()
    world.admin("nodes", "remove", str(world.node_id("laptop2")))
    took = _within(2.0, "the pi to drop laptop2", lambda: key not in pi.peers_in_kernel())
    assert took <= 2.0

"""The world of the control-mode mesh tests: the lab, meshpi-control in its
"internet" namespace (203.0.113.10:8443), and agents in control mode on the pi
(exit node + LAN router, port forward 198.51.100.1:51820), the laptop and laptop2
(both behind the laptop router's NAT), all joined with `meshpi up`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey

from appliance.client.localapi import LocalClient
from appliance.wire.loginurl import login_url
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.topology import HOME_WAN_V4, SERVER_V4, Lab

CONTROL = f"http://{SERVER_V4}:8443"
BIN = REPO_ROOT / ".venv" / "bin"


@dataclass
class Node:
    name: str
    host: Host
    state: Path
    interface: str

    @property
    def local_api(self) -> Path:
        return self.state / "local.sock"  # /run/meshpi is shared by every namespace

    def meshpi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        api = (
            ["--local-api", str(self.local_api)]
            if args[0] in ("up", "set", "status", "logout", "rotate-key")
            else []
        )
        return self.host.run([str(BIN / "meshpi"), *args, "--state-dir", str(self.state), *api], check=check)

    def status(self) -> dict[str, object]:
        return json.loads(self.meshpi("status", "--json").stdout)  # type: ignore[no-any-return]

    def mesh_v4(self) -> str:
        return str(self.status()["self"]["addresses"][0])  # type: ignore[index]

    def api(self) -> LocalClient:
        return LocalClient(self.local_api)

    def peers_in_kernel(self) -> str:
        return self.host.run(["wg", "show", self.interface, "allowed-ips"]).stdout

    def log(self) -> str:
        """The agent's log so far (mesh_world starts it with its output there)."""
        return (self.state.parent / f"{self.name}-agent.log").read_text(errors="replace")


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
            *args,  # the admin API: on loopback in control's namespace (STATE/admin.url)
        ]
        return self.lab.internet.run(cmd).stdout

    def node_id(self, name: str) -> int:
        for line in self.admin("nodes", "list").splitlines()[1:]:
            fields = line.split()
            if fields[1] == name:
                return int(fields[0])
        raise AssertionError(f"no node {name}")


def start_control(lab: Lab, state: Path) -> subprocess.Popen[bytes]:
    proc = lab.internet.popen(
        [str(BIN / "meshpi-control"), "--state-dir", str(state), "serve", "--listen", f"{SERVER_V4}:8443"],
        log=lab.scratch / "control.log",
    )
    wait_for(lambda: lab.internet.run(["ss", "-ltn", "sport = :8443"]).stdout.count("LISTEN"), 10, "control")
    return proc


@contextlib.contextmanager
def mesh_world(prepare: Callable[[Lab, contextlib.ExitStack[None]], None] | None = None) -> Iterator[World]:
    """The lab with control in `inet` and the pi, laptop and laptop2 joined;
    `prepare(lab, stack)` runs before anything starts (resolvers, resolv.conf files)."""
    with (
        Lab(laptop2=True, keep=bool(os.environ.get("MESHPI_KEEP_LAB"))) as lab,
        contextlib.ExitStack() as stack,
    ):
        if prepare is not None:
            prepare(lab, stack)
        control_state = lab.scratch / "control"
        control = start_control(lab, control_state)
        key = (control_state / "control.key").read_text().strip()
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
            node.host.popen([str(BIN / "meshpi"), "agent", "--state-dir", str(node.state),
                             "--local-api", str(node.local_api)],
                            log=lab.scratch / f"{node.name}-agent.log")  # fmt: skip
        extra = {
            "pi": ["--advertise-exit-node", "--advertise-routes", "192.168.77.0/24",
                   "--advertise-endpoint", f"{HOME_WAN_V4}:51820"],
            "laptop": ["--listen-port", "51821"],
            "laptop2": ["--listen-port", "51822"],
        }  # fmt: skip
        for node in nodes.values():
            wait_for(lambda n=node: n.local_api.exists(), 10, f"{node.name} agent")
            res = node.meshpi("up", "--login-server", login, "--auth-key", auth, "--hostname", node.name,
                              "--backend", "userspace", "--interface", node.interface, *extra[node.name])  # fmt: skip
            assert res.stdout.startswith("connected"), res.stdout + res.stderr
        try:
            yield world
        finally:
            for node in nodes.values():
                node.meshpi("down", check=False)

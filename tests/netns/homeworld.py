"""A pi at home behind miniupnpd (tests/lab/portmap_lab.py) and a laptop away, both
meshpi agents in control mode, with control either on the internet (a VPS) or on
the pi itself (a mesh created on the pi: the image's default).

    control_here=False: inet 5.5.5.254 runs meshpi-control (:8080, STUN :3478)
    control_here=True:  the pi runs meshpi-control (:8080, STUN :3478) and `create-mesh`
    away=False: the laptop is the inet host itself; away=True: behind its own NAT
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from appliance.wire.loginurl import login_url
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.portmap_lab import INET_V4, Miniupnpd, PortmapLab

BIN = REPO_ROOT / ".venv" / "bin"
CONTROL_PORT = 8080


class Agent:
    def __init__(self, lab: PortmapLab, host: Host, name: str, interface: str, *flags: str) -> None:
        self.host, self.name, self.interface = host, name, interface
        self.state = lab.scratch / name
        self.sock = self.state / "local.sock"
        self.log = lab.scratch / f"{name}-agent.log"
        self.proc = host.popen([str(BIN / "meshpi"), "agent", "--state-dir", str(self.state),
                                "--local-api", str(self.sock), *flags], log=self.log)  # fmt: skip
        wait_for(lambda: self.sock.exists(), 10, f"{name}'s agent")

    def meshpi(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "meshpi"), *args, "--state-dir", str(self.state), "--local-api", str(self.sock)]
        return self.host.run(cmd, check=check, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return json.loads(self.meshpi("status", "--json").stdout)  # type: ignore[no-any-return]

    def up(self, login: str, auth: str, port: int) -> None:
        res = self.meshpi("up", "--login-server", login, "--auth-key", auth, "--hostname", self.name,
                          "--backend", "userspace", "--interface", self.interface, "--listen-port", str(port))  # fmt: skip
        assert res.stdout.startswith("connected"), res.stdout + res.stderr

    def mesh_v4(self) -> str:
        return str(self.status()["self"]["addresses"][0])

    def peer(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.status()["peers"] if p["name"] == name), None)


@dataclass
class HomeWorld:
    lab: PortmapLab
    upnpd: Miniupnpd
    pi: Agent
    laptop: Agent
    login: str  # the login URL the laptop used
    control_state: Path
    control_host: Host

    def auth_key(self) -> str:
        admin = [str(BIN / "meshpi-control"), "--state-dir", str(self.control_state)]
        return self.control_host.run(
            [*admin, "keys", "create", "--reusable", "--expires", "600"]
        ).stdout.strip()


def _control(lab: PortmapLab, host: Host, state: Path) -> subprocess.Popen[bytes]:
    proc = host.popen([str(BIN / "meshpi-control"), "--state-dir", str(state), "serve",
                       "--listen", f"0.0.0.0:{CONTROL_PORT}"], log=lab.scratch / "control.log")  # fmt: skip
    wait_for(
        lambda: host.run(["ss", "-ltn", f"sport = :{CONTROL_PORT}"]).stdout.count("LISTEN"), 10, "control"
    )
    return proc


@contextlib.contextmanager
def home_world(away: bool = False, control_here: bool = False, keep: bool = False) -> Iterator[HomeWorld]:
    with PortmapLab(away=away, keep=keep) as lab:
        upnpd = Miniupnpd(lab).start()
        tag = f"{os.getpid() % 1000}{lab.run_id.split('x')[1]}"[-6:]  # /var/run/wireguard is shared
        laptop_host = lab.hosts["laptop"] if away else lab.internet
        control_host = lab.pi if control_here else lab.internet
        state = lab.scratch / "control"
        control = _control(lab, control_host, state)
        local = ["--control-start", "", "--control-state-dir", str(state),
                 "--control-url", f"http://127.0.0.1:{CONTROL_PORT}"]  # fmt: skip
        pi = Agent(lab, lab.pi, "pi", f"mph{tag}p", *(local if control_here else ()))
        laptop = Agent(lab, laptop_host, "laptop", f"mph{tag}l")
        world = None
        try:
            if control_here:
                pi.meshpi(
                    "set", "--backend", "userspace", "--interface", pi.interface, "--listen-port", "51820"
                )
                created = pi.meshpi("create-mesh", timeout=150)
                assert created.stdout.startswith("connected"), created.stdout + created.stderr
                # What create-mesh printed for other nodes; the test logs the laptop in with it.
                printed = re.search(r"--login-server '([^']+)'", created.stdout)
                login = printed[1] if printed else ""
            else:
                pub = PrivateKey(base64.b64decode((state / "control.key").read_text().strip())).public_key
                login = login_url(f"http://{INET_V4}:{CONTROL_PORT}", pub)
            world = HomeWorld(lab, upnpd, pi, laptop, login, state, control_host)
            if not control_here:
                auth = world.auth_key()
                pi.up(login, auth, 51820)
                laptop.up(login, auth, 51821)
            yield world
        finally:
            for node in (pi, laptop):
                node.meshpi("down", check=False)
            lab.stop_process(control)

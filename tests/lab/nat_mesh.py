"""Two meshpi agents in control mode behind the NATs of tests/lab/nat_lab.py,
meshpi-control (relay, STUN) in its internet; helpers to watch the path each
agent chose and to time the first packet.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from appliance.client.localapi import LocalClient
from appliance.wire.loginurl import login_url
from tests.lab.host import REPO_ROOT, Host, LabError, wait_for
from tests.lab.nat_lab import INET_A, WG_PORT, NatLab

BIN = REPO_ROOT / ".venv" / "bin"
CONTROL = f"http://{INET_A}:8080"


@dataclass
class MeshNode:
    name: str
    host: Host
    state: Path
    interface: str
    proc: subprocess.Popen[bytes]

    @property
    def sock(self) -> Path:
        return self.state / "local.sock"

    def meshpi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "meshpi"), *args, "--state-dir", str(self.state), "--local-api", str(self.sock)]
        return self.host.run(cmd, check=check)

    def status(self) -> dict[str, Any]:
        """/v1/status, straight from the agent's socket (a path in the file system
        reaches it from any network namespace): ~10 ms, not a `meshpi status`
        process, which would weigh on the first-packet times measured here."""
        return LocalClient(self.sock, timeout=10).get("/v1/status")  # type: ignore[no-any-return]

    def peer(self) -> dict[str, Any] | None:
        peers = self.status().get("peers") or []
        return peers[0] if peers else None

    def path(self) -> str | None:
        peer = self.peer()
        return None if peer is None else str(peer.get("path"))

    def mesh_v4(self) -> str:
        return str(self.status()["self"]["addresses"][0])


@dataclass
class NatMesh:
    lab: NatLab
    a: MeshNode
    b: MeshNode
    joined_at: float  # monotonic, when both `up`s returned
    saw_each_other_s: float = 0.0  # from joined_at until each agent had the other in its netmap

    def first_packet(self, timeout: float = 60.0) -> float:
        """Seconds from both nodes joined until a ping a -> b is answered: one ping
        process sends every 50 ms until the first answer (`-c 1 -w`), so a request
        lost before the path is up costs 50 ms of measurement, not a 1 s wait."""
        target = self.b.mesh_v4()
        cmd = ["ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", str(int(timeout)), target]
        res = self.a.host.run(cmd, check=False, timeout=timeout + 10)
        if res.returncode != 0:
            raise LabError(f"no answer {self.a.name} -> {self.b.name} within {timeout:g}s: {res.stdout}")
        took = time.monotonic() - self.joined_at
        if os.environ.get("MESHPI_LAB_VERBOSE"):
            print(f"first packet at {time.time():.3f}, {took:.3f}s after joined")
        return took

    def wait_path(self, both: str, timeout: float) -> tuple[str, str]:
        """Until both sides' path starts with `both` ("direct", "relayed")."""

        def reached() -> tuple[str, str] | None:
            pa, pb = self.a.path() or "", self.b.path() or ""
            return (pa, pb) if pa.startswith(both) and pb.startswith(both) else None

        try:
            return wait_for(reached, timeout, f"both paths {both}", interval=0.5)  # type: ignore[return-value]
        except LabError as e:
            raise LabError(f"{e}; now {self.a.path()!r} / {self.b.path()!r}") from None

    def settled(self, timeout: float) -> tuple[str, str]:
        """The paths once neither side is trying any more."""

        def done() -> tuple[str, str] | None:
            pa, pb = self.a.path() or "trying", self.b.path() or "trying"
            return None if "trying" in (pa, pb) else (pa, pb)

        return wait_for(done, timeout, "both paths settled", interval=0.5)  # type: ignore[return-value]


@contextlib.contextmanager
def nat_mesh(kind_a: str, kind_b: str) -> Iterator[NatMesh]:
    """The lab with control running and both nodes joined (`up` returned)."""
    with NatLab(kind_a, kind_b, keep=bool(os.environ.get("MESHPI_KEEP_LAB"))) as lab:
        state = lab.scratch / "control"
        control = lab.internet.popen(
            [
                str(BIN / "meshpi-control"),
                "--state-dir",
                str(state),
                "serve",
                "--listen",
                f"{INET_A}:8080",
                # Bound, so answers to node b leave from this address too (not from inet's
                # address on b's side), as the NAT's conntrack expects.
                "--stun-listen",
                f"{INET_A}:3478",
            ],
            log=lab.scratch / "control.log",
        )
        wait_for(
            lambda: lab.internet.run(["ss", "-ltn", "sport = :8080"]).stdout.count("LISTEN"), 10, "control"
        )
        pub = PrivateKey(base64.b64decode((state / "control.key").read_text().strip())).public_key
        login = login_url(CONTROL, pub)
        admin = [str(BIN / "meshpi-control"), "--state-dir", str(state)]
        # The admin API is on control's loopback listener; the CLI finds it in the state dir.
        auth = lab.internet.run([*admin, "keys", "create", "--reusable", "--expires", "600"]).stdout.strip()
        tag = f"mpn{os.getpid() % 10000}"
        nodes = {}
        for side in ("a", "b"):
            host = lab.node(side)
            node_state = lab.scratch / f"node{side}"
            node_state.mkdir()
            sock = node_state / "local.sock"
            proc = host.popen([str(BIN / "meshpi"), *(["-v"] if os.environ.get("MESHPI_LAB_VERBOSE") else []), "agent", "--state-dir", str(node_state),
                               "--local-api", str(sock)], log=lab.scratch / f"node{side}-agent.log")  # fmt: skip
            nodes[side] = MeshNode(f"node{side}", host, node_state, f"{tag}{side}", proc)
        for node in nodes.values():
            wait_for(node.sock.exists, 10, f"{node.name}'s agent")
        for node in nodes.values():
            res = node.meshpi("up", "--login-server", login, "--auth-key", auth, "--hostname", node.name,
                              "--backend", "userspace", "--interface", node.interface,
                              "--listen-port", str(WG_PORT))  # fmt: skip
            if not res.stdout.startswith("connected"):
                raise LabError(f"{node.name}: up: {res.stdout}{res.stderr}")
        mesh = NatMesh(lab, nodes["a"], nodes["b"], time.monotonic())
        try:
            wait_for(
                lambda: mesh.a.peer() is not None and mesh.b.peer() is not None, 20, "each to see the other"
            )
            mesh.saw_each_other_s = time.monotonic() - mesh.joined_at
            yield mesh
        except BaseException:
            _print_tails(lab.scratch)  # pytest shows them with the failure
            raise
        finally:
            for node in nodes.values():
                node.meshpi("down", check=False)
            lab.stop_process(control)


def _print_tails(scratch: Path, lines: int = 80) -> None:
    """The last lines of every log in the lab's scratch dir (control's, each agent's)."""
    for path in sorted(scratch.glob("*.log")):
        print(f"--- {path.name}:", *path.read_text(errors="replace").splitlines()[-lines:], sep="\n")

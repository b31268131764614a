"""meshpi nodes in the lab: keys, prefs, netmaps (files the agent watches), agents.

There is no control server here: `Mesh` plays control's part by writing each node
a netmap built from all nodes, the way control would after approving routes.

    mesh = Mesh.standard(lab)                 # pi = exit node + LAN router, laptop uses it
    mesh.start()                              # keys, netmaps, prefs, agents
    mesh.wait_until(lambda: lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4, 20, "exit via pi")

Interface names differ per node (meshpi0, meshpi1, ...) because wireguard-go keeps
its UAPI sockets in /var/run/wireguard/, which all namespaces share.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.lab import cleanup
from tests.lab.host import REPO_ROOT, WIREGUARD_PORT, Host, LabError
from tests.lab.topology import HOME_LAN_V4, HOME_WAN_V4, Lab

logger = logging.getLogger(__name__)

MESH_V4 = "100.64.0.0/10"
MESH_V6 = "fd7a:6d70:6900::/48"
EXIT_ROUTES = ("0.0.0.0/0", "::/0")
T = TypeVar("T")


def meshpi_binary() -> Path:
    return REPO_ROOT / ".venv" / "bin" / "meshpi"


def write_json_atomic(path: Path, data: object) -> None:
    """tmp + fsync + rename: the agent never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_prefs(interface: str) -> dict[str, Any]:
    return {
        "interface": interface,
        "listen_port": WIREGUARD_PORT,
        "mtu": 1280,
        "backend": "userspace",
        "advertise_exit_node": False,
        "advertise_routes": [],
        "exit_node": None,
        "exit_node_allow_lan_access": False,
    }


class MeshNode:
    """One meshpi node: a lab host, its state dir and files, its agent."""

    def __init__(
        self,
        name: str,
        host: Host,
        index: int,
        endpoint: str | None,
        prefs: dict[str, Any],
        interface_prefix: str = "meshpi",
    ) -> None:
        self.name, self.host, self.index, self.endpoint = name, host, index, endpoint
        self.interface = f"{interface_prefix}{index - 1}"
        self.addresses = [f"100.64.0.{index}", f"fd7a:6d70:6900::{index}"]
        self.dir = host.lab.scratch / name
        self.state_dir = self.dir / "state"
        self.netmap_path, self.prefs_path = self.dir / "netmap.json", self.dir / "prefs.json"
        self.log_path = self.dir / "agent.log"
        self.local_api = self.dir / "local.sock"  # its LocalAPI (/run/meshpi is shared by all namespaces)
        self.prefs = default_prefs(self.interface) | prefs
        self.approved_routes: list[str] | None = None  # None: approve what is advertised
        self.public_key: str | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.resolv_conf: Path | None = None  # the host's DNS the agent manages (agent --resolv-conf)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)

    def __repr__(self) -> str:
        return f"MeshNode({self.name!r}, {self.interface}, ns={self.host.ns!r})"

    @property
    def mesh_v4(self) -> str:
        return self.addresses[0]

    def advertised_routes(self) -> list[str]:
        exit_routes = list(EXIT_ROUTES) if self.prefs["advertise_exit_node"] else []
        return exit_routes + list(self.prefs["advertise_routes"])

    def routes(self) -> list[str]:
        """The approved routes, as control would put them in the netmap."""
        if self.approved_routes is not None:
            return list(self.approved_routes)
        return self.advertised_routes()

    def meshpi(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run([str(meshpi_binary()), *args], check=check)

    def keygen(self) -> str:
        """Create the node key (if missing) and learn its public key."""
        out = self.meshpi("key", "--state-dir", str(self.state_dir)).stdout.strip()
        key = out.splitlines()[-1].strip() if out else ""
        try:
            if len(base64.b64decode(key, validate=True)) != 32:
                raise ValueError("not 32 bytes")
        except (binascii.Error, ValueError) as exc:
            raise LabError(f"{self.name}: `meshpi key` printed {out!r}, not a key: {exc}") from exc
        self.public_key = key
        return key

    def write_prefs(self, **changes: Any) -> None:
        self.prefs.update(changes)
        write_json_atomic(self.prefs_path, self.prefs)

    def start_agent(self) -> subprocess.Popen[bytes]:
        if self.agent is not None and self.agent.poll() is None:
            raise LabError(f"{self.name}: agent already running (pid {self.agent.pid})")
        cmd = [str(meshpi_binary()), "agent", "--netmap", str(self.netmap_path),
               "--prefs", str(self.prefs_path), "--state-dir", str(self.state_dir),
               "--local-api", str(self.local_api)]  # fmt: skip
        if self.resolv_conf is not None:
            cmd += ["--resolv-conf", str(self.resolv_conf)]
        self.agent = self.host.popen(cmd, log=self.log_path)
        return self.agent

    def kill_agent(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send sig to the agent alone (not its wireguard-go) and wait; returns its exit code."""
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.agent.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(timeout=timeout)
        return self.agent.returncode

    def agent_running(self) -> bool:
        return self.agent is not None and self.agent.poll() is None

    def agent_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.meshpi("down", "--state-dir", str(self.state_dir), check=False)

    def transfer(self) -> tuple[int, int] | None:
        """(rx, tx) bytes over all peers from `wg show <if> transfer`; None without a device."""
        res = self.host.run(["wg", "show", self.interface, "transfer"], check=False)
        if res.returncode != 0:
            return None
        rx = tx = 0
        for line in res.stdout.splitlines():
            _, peer_rx, peer_tx = line.split("\t")
            rx, tx = rx + int(peer_rx), tx + int(peer_tx)
        return rx, tx


class Mesh:
    """The lab's meshpi nodes, and control's job of telling each about the others."""

    def __init__(self, lab: Lab, interface_prefix: str = "meshpi") -> None:
        # Two meshes running at once (parallel test runs) need different prefixes:
        # the interface name is also the name of wireguard-go's socket, shared by all.
        self.lab, self.interface_prefix = lab, interface_prefix
        self.nodes: dict[str, MeshNode] = {}

    def add(self, name: str, host: Host, endpoint: str | None = None, **prefs: Any) -> MeshNode:
        node = MeshNode(name, host, len(self.nodes) + 1, endpoint, prefs, self.interface_prefix)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> MeshNode:
        return self.nodes[name]

    @classmethod
    def standard(cls, lab: Lab, interface_prefix: str = "meshpi") -> Mesh:
        """pi: exit node + router for the home LAN, reachable through the port forward;
        laptop (and laptop2 if the lab has it): no reachable endpoint, exit via the pi."""
        mesh = cls(lab, interface_prefix)
        mesh.add("pi", lab.pi, endpoint=f"{HOME_WAN_V4}:{WIREGUARD_PORT}",
                 advertise_exit_node=True, advertise_routes=[HOME_LAN_V4])  # fmt: skip
        mesh.add("laptop", lab.laptop, exit_node="pi")
        if lab.laptop2 is not None:
            mesh.add("laptop2", lab.laptop2, exit_node="pi")
        return mesh

    def netmap(self, node: MeshNode) -> dict[str, Any]:
        def entry(n: MeshNode) -> dict[str, Any]:
            if n.public_key is None:
                raise LabError(f"{n.name}: no public key yet (call keygen() first)")
            return {"name": n.name, "public_key": n.public_key,
                    "addresses": list(n.addresses), "routes": n.routes()}  # fmt: skip

        peers = [entry(p) | {"endpoint": p.endpoint} for p in self.nodes.values() if p is not node]
        return {"mesh": {"ipv4": MESH_V4, "ipv6": MESH_V6}, "self": entry(node), "peers": peers}

    def write_netmaps(self) -> None:
        for node in self.nodes.values():
            write_json_atomic(node.netmap_path, self.netmap(node))

    def start(self) -> None:
        """Keys, netmaps and prefs for every node, then every agent."""
        for node in self.nodes.values():
            node.keygen()
        self.write_netmaps()
        for node in self.nodes.values():
            node.write_prefs()
            node.start_agent()

    def stop(self) -> None:
        """SIGTERM the agents (so they can clean up), then remove stale UAPI sockets.

        The lab's teardown would kill them anyway, but only this knows the interfaces."""
        for node in self.nodes.values():
            if node.agent is not None:
                self.lab.stop_process(node.agent)
        # By design the tunnel outlives its agent, so wireguard-go may still run; once
        # killed it leaves its socket behind in the directory all namespaces share.
        cleanup.kill_wireguard_go_in([node.host.ns for node in self.nodes.values()])
        interfaces = [node.interface for node in self.nodes.values()]
        cleanup.remove_stale_sockets(interfaces)

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_until(
        self, predicate: Callable[[], T], timeout: float, what: str = "condition",
        interval: float = 0.1,
    ) -> T:  # fmt: skip
        """Poll predicate until it returns something truthy; exceptions count as "not yet".

        On timeout, raise LabError quoting the last exception and the agents' log tails."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                last = exc
            time.sleep(interval)
        tails = "\n".join(
            f"--- {n.name} agent ({'running' if n.agent_running() else 'not running'}):\n"
            + "\n".join(n.agent_log().splitlines()[-15:])
            for n in self.nodes.values()
        )
        raise LabError(f"timed out after {timeout:g}s waiting for {what}; last error: {last}\n"
                       f"{tails}")  # fmt: skip

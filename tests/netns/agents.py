"""Real `meshpi agent` processes in network namespaces, each with its own LocalAPI
socket, for the LocalAPI tests (test_localapi*.py)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.client.localapi import AgentNotRunning, LocalClient
from tests.lab.mesh import meshpi_binary
from tests.netns.kernelstate import sh
from tests.unit.meshes import KEYS


@dataclass
class RunningAgent:
    ns: str
    state: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, timeout: float = 30.0) -> LocalClient:
        return LocalClient(self.socket, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def meshpi(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The CLI, run in the agent's namespace against its socket and state."""
        cmd = ["ip", "netns", "exec", self.ns, str(meshpi_binary()), *args,
               "--local-api", str(self.socket), "--state-dir", str(self.state)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["ip", "netns", "exec", self.ns, str(meshpi_binary()), "down",
                        "--state-dir", str(self.state)], capture_output=True, timeout=30)  # fmt: skip


def state_dir(path: Path, key: str) -> Path:
    """A state directory holding one of the test keys (tests.unit.meshes.KEYS)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    (path / "node.key").write_text(KEYS[key].secret_base64() + "\n")
    (path / "node.key").chmod(0o600)
    return path


def start_agent(ns: str, state: Path, socket: Path, *args: str, wait: float = 20) -> RunningAgent:
    """`meshpi agent ARGS --state-dir STATE --local-api SOCKET` in `ns`, once its
    LocalAPI answers."""
    log = state.parent / f"{state.name}-agent.log"
    cmd = ["ip", "netns", "exec", ns, str(meshpi_binary()), "agent", *args,
           "--state-dir", str(state), "--local-api", str(socket)]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    agent = RunningAgent(ns, state, socket, proc, log)
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the agent exited {proc.returncode}:\n{agent.log_text()}")
        with contextlib.suppress(AgentNotRunning):
            agent.client().get("/v1/status")
            return agent
        if time.monotonic() > deadline:
            agent.stop()
            raise AssertionError(f"no LocalAPI at {socket} within {wait} s:\n{agent.log_text()}")
        time.sleep(0.05)


def wait_status(agent: RunningAgent, check: Any, timeout: float = 10, what: str = "status") -> dict[str, Any]:
    """Poll /v1/status until check(status) holds; the last status on failure."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = agent.client().get("/v1/status")
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; last status:\n{json.dumps(status, indent=1)}"
            )
        time.sleep(0.1)


def link_mtu(ns: str, ifname: str) -> int | None:
    res = subprocess.run(["ip", "-n", ns, "-j", "link", "show", ifname], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return int(json.loads(res.stdout)[0]["mtu"])


def veth_pair(ns_a: str, ns_b: str, addr_a: str, addr_b: str) -> None:
    """eth0 in each namespace, joined by a veth pair."""
    sh("ip", "link", "add", "eth0", "netns", ns_a, "type", "veth", "peer", "name", "eth0", "netns", ns_b)
    for ns, addr in ((ns_a, addr_a), (ns_b, addr_b)):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")

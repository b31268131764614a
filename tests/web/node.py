"""A real meshpi node for the web tests: `meshpi agent` serving its LocalAPI, and
(optionally) its own `meshpi-control`, both in a throwaway network namespace.

    namespace mpw<pid>n<k>      lo only
      meshpi-control  127.0.0.1:<port>, state in <root>/control   ("the local control")
      meshpi agent    state in <root>/agent, LocalAPI <root>/local.sock,
                      --control-start '' (control is already running), --control-url -> it

The socket lives in the file system, so the web app (in the test process, in the
host's namespace) reaches the agent across namespaces. The agent's WireGuard
interface is userspace (wireguard-go) with a per-run name, because wireguard-go's
UAPI sockets share one directory across namespaces.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.client.localapi import LocalAPIError, LocalClient
from tests.lab import netns as ns

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = REPO_ROOT / ".venv" / "bin"
CONTROL_PORT = 18080
_counter = itertools.count()


@dataclass
class AgentNode:
    ns: str
    root: Path
    socket: Path
    interface: str
    procs: list[subprocess.Popen[bytes]]

    @property
    def client(self) -> LocalClient:
        return LocalClient(self.socket)

    def status(self) -> dict[str, Any]:
        st = self.client.get("/v1/status")
        assert isinstance(st, dict)
        return st

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return ns.run(self.ns, list(cmd), check=False)

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob("*.log")))

    def create_mesh(self) -> dict[str, Any]:
        answer = self.client.post("/v1/mesh/create", {}, timeout=90)
        assert answer["state"] == "connected", answer
        return answer  # type: ignore[no-any-return]


def _popen(name: str, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", name, *cmd],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait(predicate: Any, timeout: float, what: str, node_root: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = "".join(p.read_text()[-2000:] for p in node_root.glob("*.log"))
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; logs:\n{logs}")
        time.sleep(0.05)


def _answers(socket: Path) -> bool:
    try:
        LocalClient(socket, timeout=2).get("/v1/status")
    except LocalAPIError:
        return False
    return True


@contextlib.contextmanager
def second_agent(node: AgentNode, name: str) -> Iterator[AgentNode]:
    """Another agent in the same namespace (its own state, socket, interface and
    port), for a second node of the mesh."""
    k = next(_counter)
    root = node.root / name
    root.mkdir()
    other = AgentNode(node.ns, root, root / "local.sock", f"mpw{os.getpid() % 100000}x{k}", [])
    other.procs.append(_popen(node.ns, [str(BIN / "meshpi"), "agent", "--state-dir", str(root / "agent"),
                                        "--local-api", str(other.socket), "--control-start", ""],
                              root / "agent.log"))  # fmt: skip
    try:
        _wait(lambda: _answers(other.socket), 15, f"{name}'s LocalAPI", root)
        other.client.patch("/v1/prefs", {"interface": other.interface, "backend": "userspace",
                                         "listen_port": 51900 + k, "hostname": name})  # fmt: skip
        yield other
    finally:
        ns.run(node.ns, [str(BIN / "meshpi"), "down", "--state-dir", str(root / "agent")], check=False)
        for proc in other.procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


@contextlib.contextmanager
def agent_node(local_control: bool = True) -> Iterator[AgentNode]:
    """A running agent (not logged in), with a local control when asked."""
    k = next(_counter)
    name = f"mpw{os.getpid()}n{k}"
    root = Path(tempfile.mkdtemp(prefix=f"meshpi-web-{name}-"))
    os.chmod(root, 0o755)  # a non-root meshpi-web may reach the socket (mode 0660 protects it)
    sock = root / "local.sock"
    node = AgentNode(name, root, sock, f"mpw{os.getpid() % 100000}x{k}", [])
    ns.create(name)
    try:
        control_state = root / "control"
        if local_control:
            node.procs.append(_popen(name, [str(BIN / "meshpi-control"), "--state-dir", str(control_state),
                                            "serve", "--listen", f"127.0.0.1:{CONTROL_PORT}"],
                                     root / "control.log"))  # fmt: skip
            _wait(lambda: (control_state / "admin.token").exists(), 15, "meshpi-control", root)
        node.procs.append(_popen(name, [
            str(BIN / "meshpi"), "agent", "--state-dir", str(root / "agent"), "--local-api", str(sock),
            "--control-start", "", "--control-state-dir", str(control_state),
            "--control-url", f"http://127.0.0.1:{CONTROL_PORT}",
        ], root / "agent.log"))  # fmt: skip
        _wait(lambda: _answers(sock), 15, "the agent's LocalAPI", root)
        node.client.patch("/v1/prefs", {"interface": node.interface, "backend": "userspace"})
        yield node
    finally:
        ns.run(name, [str(BIN / "meshpi"), "down", "--state-dir", str(root / "agent")], check=False)
        ns.delete(name)
        for proc in node.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        shutil.rmtree(root, ignore_errors=True)

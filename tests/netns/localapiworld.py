"""The world of the LocalAPI tests (test_localapi*.py): the agent's LocalAPI on a
real unix socket, served by real static-mode agents.

    ns pi      eth0 10.99.0.1/24 ==veth== eth0 10.99.0.2/24   ns laptop
    agent: exit node, mesh 100.64.0.1                         agent: peer pi at 10.99.0.1:51820
    socket <public dir>/pi/local.sock (group nogroup)         socket <public dir>/laptop/local.sock

The socket directory is world-traversable (0755) so that a process of another
user can try the socket: its mode and group decide, as on the appliance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab import netns as ns
from tests.netns.agents import RunningAgent, start_agent, state_dir, veth_pair
from tests.unit.meshes import netmap_json, node

TAG = f"mpa{os.getpid() % 10000}"
PI_IF, LAPTOP_IF = f"{TAG}p", f"{TAG}l"
SOCKET_GROUP = "nogroup"  # exists on Debian; the pi's agent is started with --local-api-group nogroup


@dataclass
class World:
    pi: RunningAgent
    laptop: RunningAgent
    dir: Path
    prefs_path: Path


def _write(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@contextlib.contextmanager
def localapi_world() -> Iterator[World]:
    """The pi's and the laptop's agents, each in its namespace; all removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="meshpi-localapi-", dir="/tmp"))
    base.chmod(0o755)
    names = {"pi": f"{TAG}pi", "laptop": f"{TAG}lap"}
    agents: list[RunningAgent] = []
    try:
        for name in names.values():
            ns.create(name)
        veth_pair(names["pi"], names["laptop"], "10.99.0.1/24", "10.99.0.2/24")
        files = {}
        for who, ifname, doc in (
            ("pi", PI_IF, netmap_json("pi", [node("laptop")], ["0.0.0.0/0", "::/0"])),
            (
                "laptop",
                LAPTOP_IF,
                netmap_json("laptop", [node("pi", ["0.0.0.0/0", "::/0"], "10.99.0.1:51820")]),
            ),
        ):
            (base / who).mkdir()
            _write(base / who / "netmap.json", doc)
            prefs = {"interface": ifname, "backend": "userspace", "advertise_exit_node": who == "pi"}
            _write(base / who / "prefs.json", prefs)
            files[who] = [
                "--netmap",
                str(base / who / "netmap.json"),
                "--prefs",
                str(base / who / "prefs.json"),
            ]
        # A stale socket (its agent died) is replaced by the next agent.
        stale = base / "laptop" / "run" / "local.sock"
        stale.parent.mkdir()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))
        agents.append(start_agent(names["pi"], state_dir(base / "pi" / "state", "pi"), base / "pi" / "run" / "local.sock",
                                  *files["pi"], "--local-api-group", SOCKET_GROUP,
                                  "--control-state-dir", str(base / "no-control")))  # fmt: skip
        agents.append(start_agent(names["laptop"], state_dir(base / "laptop" / "state", "laptop"), stale,
                                  *files["laptop"]))  # fmt: skip
        yield World(agents[0], agents[1], base, base / "pi" / "prefs.json")
    finally:
        for agent in agents:
            agent.stop()
        for name in names.values():
            ns.delete(name)
        shutil.rmtree(base, ignore_errors=True)

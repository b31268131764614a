"""`python -m tests.lab demo`: the pi as exit node for the laptop, watched from the internet.

Every interval it prints one line: what the internet server sees as the laptop's
address (the home router's 198.51.100.1 once the laptop exits through the pi, its
own router's 192.0.2.1 while it goes direct), the laptop's ping RTT to the server,
and the bytes through the pi's tunnel. `sample()` needs no agent, so it is tested
on a bare lab.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from tests.lab.host import LabError
from tests.lab.mesh import Mesh, MeshNode, meshpi_binary
from tests.lab.topology import HOME_WAN_V4, LAPTOP_ROUTER_WAN_V4, SERVER_V4, Lab

logger = logging.getLogger(__name__)

PATHS = {HOME_WAN_V4: "via the pi (exit node)", LAPTOP_ROUTER_WAN_V4: "direct, not via the mesh"}


@dataclass(frozen=True)
class Sample:
    whoami: str | None  # the laptop's address as the internet server sees it
    rtt_ms: float | None
    transfer: tuple[int, int] | None  # (rx, tx) of the exit node's WireGuard device
    agents: dict[str, bool] = field(default_factory=dict)  # node name -> running


def sample(lab: Lab, exit_node: MeshNode | None = None, mesh: Mesh | None = None) -> Sample:
    try:
        whoami: str | None = lab.laptop.fetch(SERVER_V4, "whoami", timeout=1.5)
    except LabError as exc:
        logger.debug("whoami failed: %s", exc)
        whoami = None
    rtt = lab.laptop.ping_result(SERVER_V4, count=1, wait=1).rtt_avg_ms
    transfer = exit_node.transfer() if exit_node is not None else None
    agents = {n.name: n.agent_running() for n in mesh.nodes.values()} if mesh else {}
    return Sample(whoami, rtt, transfer, agents)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def format_sample(s: Sample, clock: str | None = None) -> str:
    clock = clock or time.strftime("%H:%M:%S")
    who = f"{s.whoami} ({PATHS.get(s.whoami, 'unexpected')})" if s.whoami else "unreachable"
    rtt = f"{s.rtt_ms:.2f}ms" if s.rtt_ms is not None else "lost"
    tunnel = f"rx={_size(s.transfer[0])} tx={_size(s.transfer[1])}" if s.transfer else "no device"
    agents = " ".join(f"{name}={'up' if up else 'DOWN'}" for name, up in s.agents.items())
    line = f"{clock}  server sees laptop as {who}  ping={rtt}  pi tunnel {tunnel}"
    return f"{line}  agents: {agents}" if agents else line


def run(interval: float = 2.0, count: int | None = None, laptop2: bool = False) -> int:
    """The demo loop; returns an exit code. Ctrl-C ends it (and tears the lab down)."""
    with Lab(laptop2=laptop2) as lab, Mesh.standard(lab) as mesh:
        lab.internet.whoami_server()
        print(f"lab {lab.prefix}* up; enter a host with: ip netns exec {lab.laptop.ns} bash")
        try:
            if not meshpi_binary().exists():
                raise LabError(f"{meshpi_binary()} is missing (run ./scripts/setup)")
            mesh.start()
            print(f"agents started; logs in {lab.scratch}/<node>/agent.log")
        except LabError as exc:
            print(f"mesh not running, showing the underlay only: {exc}")
        exit_node = mesh["pi"] if mesh["pi"].public_key else None
        reported: set[str] = set()
        n = 0
        while count is None or n < count:
            started = time.monotonic()
            s = sample(lab, exit_node, mesh if exit_node else None)
            print(format_sample(s), flush=True)
            for name, up in s.agents.items():
                if not up and name not in reported:  # say why, once
                    reported.add(name)
                    tail = mesh[name].agent_log().splitlines()[-10:]
                    print(f"  {name}'s agent exited; last log lines:")
                    print("\n".join(f"    {line}" for line in tail))
            n += 1
            if count is None or n < count:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    return 0

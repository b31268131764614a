"""The agent under its unit's limits, with real traffic: the pi's agent runs with
exactly meshpi-agent.service's CapabilityBoundingSet, NoNewPrivileges, and a
read-only file system except its own directory (state, LocalAPI socket) and
/run/wireguard (ProtectSystem=strict; /proc/sys and /sys stay writable, as in the
unit; /tmp is read-only here, stricter than the unit's PrivateTmp). It is an
exit node and LAN router for the laptop, on wireguard-go (userspace: /dev/net/tun).

Without a running systemd here, setpriv(1) and a mount namespace stand in for
systemd's own sandboxing: the system-call filter, device policy and address-family
list are exercised by the image tier only (tests/image/test_image.py boots the unit).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.host import REPO_ROOT, WIREGUARD_PORT, wait_for
from tests.lab.mesh import Mesh, meshpi_binary
from tests.lab.topology import HOME_WAN_V4, LANHOST_V4, PI_V4, SERVER_V4, Lab
from tests.unit.test_agent_unit import CAPABILITIES, settings

BIN = REPO_ROOT / ".venv" / "bin"
# /proc/<pid>/status bit numbers (linux/capability.h).
CAP_BITS = {"CAP_CHOWN": 0, "CAP_DAC_READ_SEARCH": 2, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12,
            "CAP_NET_RAW": 13}  # fmt: skip


@dataclass
class World:
    lab: Lab
    mesh: Mesh
    pid: int


def sandboxed(argv: list[str], writable: list[str]) -> list[str]:
    """argv with the unit's capabilities and no new privileges, in a mount namespace
    where / is read-only but for `writable` (each bound onto itself first)."""
    (bounding,) = settings()["CapabilityBoundingSet"]
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in bounding.split())
    binds = "; ".join(f"mount --bind {shlex.quote(p)} {shlex.quote(p)}" for p in writable)
    script = (
        f"set -e; mount --make-rprivate /; {binds}; "
        f'mount -o remount,bind,ro /; exec setpriv --bounding-set -all,{caps} --inh-caps -all --no-new-privs "$@"'
    )
    return ["unshare", "--mount", "sh", "-c", script, "sandboxed", *argv]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        lab.internet.whoami_server()
        control = lab.internet.popen([str(BIN / "meshpi-control"), "--state-dir", str(lab.scratch / "control"),
                                      "serve", "--listen", f"{SERVER_V4}:8443", "--stun-listen", f"{SERVER_V4}:3478"],
                                     log=lab.scratch / "control.log")  # fmt: skip
        lab.lanhost.whoami_server()
        with Mesh.standard(lab, interface_prefix=f"mp{os.getpid() % 10000}s") as mesh:
            for node in mesh.nodes.values():
                node.keygen()
            mesh.write_netmaps()
            pi, laptop = mesh["pi"], mesh["laptop"]
            for node in (pi, laptop):
                node.write_prefs()
            laptop.start_agent()
            os.makedirs("/run/wireguard", exist_ok=True)
            argv = [str(meshpi_binary()), "agent", "--netmap", str(pi.netmap_path), "--prefs",
                    str(pi.prefs_path), "--state-dir", str(pi.state_dir), "--local-api", str(pi.local_api)]  # fmt: skip
            pi.agent = pi.host.popen(sandboxed(argv, [str(pi.dir), "/run/wireguard"]), log=pi.log_path)
            mesh.wait_until(lambda: lab.laptop.fetch(SERVER_V4, timeout=1) == HOME_WAN_V4, 30,
                            "the laptop to reach the internet through the sandboxed pi")  # fmt: skip
            wait_for(lambda: "STUN on" in (lab.scratch / "control.log").read_text(errors="replace")
                     or control.poll() is not None, 15, "meshpi-control's STUN server")  # fmt: skip
            yield World(lab, mesh, pi.agent.pid)


def test_agent_sandbox_runs_with_the_units_capabilities_only(world: World) -> None:
    status = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{world.pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    assert "meshpi" in Path(f"/proc/{world.pid}/cmdline").read_text()
    wanted = sum(1 << CAP_BITS[c] for c in CAPABILITIES)
    assert int(status["CapBnd"], 16) == wanted and int(status["CapEff"], 16) == wanted
    assert status["NoNewPrivs"].strip() == "1"


def test_agent_sandbox_exit_node_and_lan_router_work(world: World) -> None:
    lab = world.lab
    assert lab.laptop.fetch(SERVER_V4) == HOME_WAN_V4  # nft masquerade, forwarding sysctls, routes
    assert lab.laptop.fetch(LANHOST_V4) == PI_V4  # the shared LAN
    table = lab.pi.run(["nft", "list", "table", "inet", "meshpi"]).stdout
    assert "masquerade" in table
    assert lab.pi.sysctl("net.ipv4.ip_forward") == "1"


def test_agent_sandbox_localapi_answers_and_nothing_failed(world: World) -> None:
    pi = world.mesh["pi"]
    status = pi.host.run([str(meshpi_binary()), "status", "--json", "--local-api", str(pi.local_api)]).stdout
    assert '"interface"' in status or pi.interface in status, status
    log = pi.agent_log()
    for bad in ("Read-only file system", "Operation not permitted", "Permission denied", "Traceback"):
        assert bad not in log, log


def test_agent_sandbox_stun_raw_socket_works_with_the_units_capabilities(world: World) -> None:
    """STUN from the WireGuard port (raw IPPROTO_UDP and a BPF filter, beside the
    running wireguard-go) under the same limits: CAP_NET_RAW is enough."""
    script = (
        "import sys; from ipaddress import ip_address; from appliance.base.net import Endpoint\n"
        "from appliance.kernel import stun\n"
        f"print(stun.probe(Endpoint(ip_address('{SERVER_V4}'), 3478), {WIREGUARD_PORT}, 51820, 3.0))\n"
    )
    pi = world.mesh["pi"]
    argv = [str(BIN / "python"), "-c", script]
    done = pi.host.run(sandboxed(argv, [str(pi.dir)]), check=False, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{HOME_WAN_V4}:{WIREGUARD_PORT}", done.stdout

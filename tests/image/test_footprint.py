"""The appliance's footprint on the booted image (issue 14): RSS of the agent, control
and the web UI at idle and with 100 peers, and how long the second boot took to an
exit node that forwards. A 512 MB Pi Zero 2 W must have room for the three.

Goals: agent <= 40 MB with 100 peers, control <= 50 MB idle, the three together
<= 120 MB. RSS is read from /proc in the VM. It moves little from run to run (the
same code, the same imports), but a page here and there does (the heap's high-water
mark, the first status call); the checks allow NOISE_MB over each goal before they
fail, so they catch a regression (a heavy import creeping back), not the jitter.

"With 100 peers" is read 75 s after they all reached the kernel, the burst of their
deltas and the first minute of trying them behind (the agent trims its C heap every
30 s); the figure right after is reported too (rss_agent_peers_100_first_mb).

The 100 peers are fake nodes (tests/image/enroll.py) registered from the client
namespace into the VM's real control; the VM's agent configures each as a kernel
WireGuard peer. They are removed again at the end, so the tests after this file see
the mesh first boot made.

Boot figures are printed, not asserted: under qemu TCG on a loaded 2-core machine
they vary by a factor of two (issue 14's goal, 60 s to exit-node ready, is for the
report and the bench).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import pytest

from tests.image.machine import REPO, TIMINGS, Vm, exit_ready_s
from tests.lab.host import wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="builds and boots the arm64 image under qemu: set MESHPI_IMAGE_TESTS=1 and run as root",
)

AGENT_100_PEERS_MB = 40.0  # issue 14's goal
CONTROL_IDLE_MB = 50.0
ALL_THREE_MB = 120.0
# Measured on the image (a loaded 2-core host): agent 37.3 MB idle, 39.3 MB with 100
# peers (46.2 before kernel/rtnl.py replaced pyroute2's IPRoute, an asyncio stack, and
# offline peers stopped getting a traffic ring; 63.3 before kernel/conntrack.py and
# kernel/wireguard_read.py stopped pyroute2 decoding the conntrack table on every status
# and the device every second); the three 116.0 / 118.4 MB.
SETTLE_S = 75  # > pathtypes.ACTIVE_FOR (60 s of close watching of new peers) + a trim
CPU_WINDOW_S = 30  # the last part of SETTLE_S
NOISE_MB = 2.0  # spread measured between runs of the same code on the host: < 0.5 MB
PEERS = 100
UNITS = {"agent": "meshpi-agent.service", "control": "meshpi-control.service", "web": "meshpi-web.service"}

# The web UI is socket-activated: a request starts it (what a browser's first visit does).
_WAKE_WEB = """import http.client
for path in ("/", "/login"):
    conn = http.client.HTTPConnection("127.0.0.1", 80, timeout=60)
    conn.request("GET", path)
    conn.getresponse().read()
"""


def rss_mb(vm: Vm) -> dict[str, float]:
    """VmRSS of each unit's main process, MB."""
    script = "; ".join(
        f"echo {name} $(grep VmRSS /proc/$(systemctl show -p MainPID --value {unit})/status)"
        for name, unit in UNITS.items()
    )
    found = dict(re.findall(r"^(\w+) VmRSS:\s+(\d+) kB$", vm.out(script), re.MULTILINE))
    assert set(found) == set(UNITS), f"no RSS for {set(UNITS) - set(found)}: is each unit running?"
    return {name: round(int(kb) / 1024, 1) for name, kb in found.items()}


def agent_cpu_s(vm: Vm) -> float:
    """CPU seconds (user + system) the agent's main process has used so far."""
    pid = vm.out("systemctl show -p MainPID --value meshpi-agent.service")
    stat, hz = vm.out(f"cat /proc/{pid}/stat; getconf CLK_TCK").splitlines()
    return sum(map(int, stat.rsplit(")", 1)[1].split()[11:13])) / int(hz)


def peer_count(vm: Vm) -> int:
    return len(vm.out("wg show meshpi0 peers").split())


@pytest.fixture(scope="module")
def footprint(vm: Vm) -> Iterator[dict[str, dict[str, float]]]:
    """RSS at idle (right after boot, the web UI woken by one visit) and with 100 peers."""
    # Right after the VM's boot (this module may run first) the agent may still be starting.
    wait_for(lambda: vm.ssh("meshpi status --json", check=False, timeout=90).returncode == 0, 300,
             "the agent's status", interval=5)  # fmt: skip
    vm.out(f"/opt/meshpi/bin/python -c '{_WAKE_WEB}'")
    vm.out("meshpi status --json > /dev/null")  # what the dashboard asks for, every few seconds
    idle = rss_mb(vm)
    status = json.loads(vm.out("meshpi status --json"))
    login = status["local_control"]["login_url"]
    key = vm.out("meshpi-control keys create --reusable --expires 900").splitlines()[-1]
    before = peer_count(vm)
    try:
        python = str(REPO / ".venv/bin/python")
        enroll = [python, "-m", "tests.image.enroll", login, key, str(PEERS)]
        enrolled = vm.net.client.run(enroll, timeout=600, cwd=REPO)
        TIMINGS["enroll_100_s"] = json.loads(enrolled.stdout.splitlines()[-1])["enroll_s"]
        wait_for(lambda: peer_count(vm) >= before + PEERS, 300, f"{PEERS} more peers on meshpi0", interval=2)
        TIMINGS["status_100_peers_first_s"] = _status_seconds(vm)
        TIMINGS["rss_agent_peers_100_first_mb"] = rss_mb(vm)[
            "agent"
        ]  # right after: the burst's high-water mark
        # What a Pi holds with 100 peers: after the burst of their deltas and the first
        # minute of trying them (the loop trims the C heap every heap.TRIM_EVERY s).
        time.sleep(SETTLE_S - CPU_WINDOW_S)
        # The agent's CPU once settled, its 100 peers never answering (offline phones
        # and laptops): path selection's checks and reads of the device go on.
        cpu0, t0 = agent_cpu_s(vm), time.monotonic()
        time.sleep(CPU_WINDOW_S)
        TIMINGS["cpu_agent_peers_100_percent"] = round(
            (agent_cpu_s(vm) - cpu0) * 100 / (time.monotonic() - t0), 1
        )
        TIMINGS["status_100_peers_s"] = _status_seconds(vm)
        loaded = rss_mb(vm)
        figures = {"idle": idle, "peers_100": loaded}
        for when, rss in figures.items():
            for name, mb in rss.items():
                TIMINGS[f"rss_{name}_{when}_mb"] = mb
            TIMINGS[f"rss_total_{when}_mb"] = round(sum(rss.values()), 1)
        yield figures
    finally:  # the tests after this file see the mesh first boot made, whatever failed here
        nodes = vm.out("meshpi-control nodes list").splitlines()[1:]
        fakes = [line.split()[0] for line in nodes if re.fullmatch(r"fake\d+", line.split()[1])]
        if fakes:  # one command: a Python start per node took 11.6 min of CI's tier under TCG
            vm.ssh(f"meshpi-control nodes remove {' '.join(fakes)}", check=False, timeout=600)
        wait_for(lambda: peer_count(vm) <= before, 300, "the fake peers gone from meshpi0", interval=2)


def _status_seconds(vm: Vm) -> float:
    """One `meshpi status` (what the dashboard asks every few seconds): how long it
    took. Reported, not asserted: with 100 peers that never answer, the agent under
    TCG has taken 30-54 s (the client gives up at 30), busy reading and kicking them."""
    started = time.monotonic()
    vm.ssh("meshpi status --json > /dev/null", check=False, timeout=180)
    return round(time.monotonic() - started, 1)


def test_image_footprint_printed(
    footprint: dict[str, dict[str, float]], capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(f"\n  image footprint (RSS, MB): {json.dumps(footprint)}")


def test_image_footprint_agent_with_100_peers(footprint: dict[str, dict[str, float]]) -> None:
    agent = footprint["peers_100"]["agent"]
    TIMINGS["agent_goal_met"] = agent <= AGENT_100_PEERS_MB
    assert agent <= AGENT_100_PEERS_MB + NOISE_MB, footprint


def test_image_footprint_control_idle(footprint: dict[str, dict[str, float]]) -> None:
    assert footprint["idle"]["control"] <= CONTROL_IDLE_MB + NOISE_MB, footprint


def test_image_footprint_all_three(footprint: dict[str, dict[str, float]]) -> None:
    TIMINGS["total_goal_met"] = all(sum(rss.values()) <= ALL_THREE_MB for rss in footprint.values())
    for when, rss in footprint.items():
        assert sum(rss.values()) <= ALL_THREE_MB + NOISE_MB, (when, footprint)


@pytest.mark.disturbs_vm
@pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_REBOOT") != "1",
    reason="MESHPI_IMAGE_REBOOT=1 runs it (~3 min; CI's reboot is the hard reset's, test_reset.py)",
)
def test_image_boot_to_exit_node_ready(vm: Vm, capsys: pytest.CaptureFixture[str]) -> None:
    """A clean reboot with the first boot done (issue 14's case; the session's second
    boot still applied meshpi.toml): seconds from the kernel's start to the agent's
    first apply, with what it waited on. Marked disturbs_vm: the reboot runs after the
    tier's other tests. Opt-in: CI's image tier reboots once, in test_reset.py, whose
    boot reports the same figure (after a power loss) and checks first boot stays done."""
    boots = vm.holds()
    vm.ssh("systemctl reboot", check=False, timeout=30)
    TIMINGS["boot3_to_ready_s"] = vm.wait_held(boots + 1, 1200)  # from the reboot command
    TIMINGS["boot3_exit_ready_s"] = exit_ready_s(vm)
    startup = vm.out("systemd-analyze time | head -1")
    chain = vm.out("systemd-analyze critical-chain --no-pager meshpi-agent.service")
    blame = vm.out("systemd-analyze blame --no-pager | head -15")
    with capsys.disabled():
        print(f"\n  exit node ready {TIMINGS['boot3_exit_ready_s']} s after the kernel started; {startup}")
        print("  critical chain:\n    " + "\n    ".join(chain.splitlines()))
        print("  blame:\n    " + "\n    ".join(blame.splitlines()))
        print(f"  image tier timings so far: {json.dumps(TIMINGS)}")
    enabled = vm.ssh("systemctl is-enabled meshpi-firstboot.service", check=False).stdout.strip()
    assert enabled == "disabled", enabled  # applied: out of the boot (exit status 1 says so too)
    assert vm.out("systemctl is-active meshpi-agent.service") == "active"

"""Path selection beside *kernel* WireGuard (issue 10), in the image's VM: a laptop
outside the VM (wireguard-go and the meshpi agent in the client namespace) and the VM's
agent prove the direct path to each other with connectivity checks, authenticated STUN
from and to the WireGuard ports (appliance/agent/reach/checks.py). On the VM the kernel
owns port 51820; the agent sends and reads the checks through its raw sockets there.

Then the direct path is cut in the VM's router (vmnet): both fall back to control's
relay; the VM's kernel peer is removed and re-added while the laptop cannot answer
(its agent stopped): the VM's agent "kicks" it (re-adds it and sends a packet, so the
kernel initiates a handshake now, not after WireGuard's 5 s rate limit); once the cut
heals, both are direct again and pings flow.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.image.machine import HOSTNAME, Laptop, Vm
from tests.image.vmnet import CLIENT_V4, VM_V4
from tests.lab.host import wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="boots the image under qemu: set MESHPI_IMAGE_TESTS=1",
)

PORT = 51822  # the laptop's WireGuard port
# The cut: vmnet forwards no UDP between the laptop and the VM (the relay is TCP, on control's port).
CUT = f"""table ip mpimg_cut {{
    chain forward {{
        type filter hook forward priority filter;
        ip saddr {CLIENT_V4} ip daddr {VM_V4} meta l4proto udp drop
        ip saddr {VM_V4} ip daddr {CLIENT_V4} meta l4proto udp drop
    }}
}}
"""


def _vm_peer(vm: Vm, key: str) -> dict[str, Any]:
    status = json.loads(vm.out("meshpi status --json"))
    found = [p for p in status.get("peers") or [] if p["public_key"] == key]
    assert found, f"no peer {key} in the VM's status: {[p['public_key'] for p in status.get('peers') or []]}"
    return found[0]


def _vm_checks(vm: Vm) -> dict[str, Any]:
    checks: dict[str, Any] = json.loads(vm.out("meshpi status --json"))["reach"]["checks"]
    return checks


def _laptop_path(laptop: Laptop) -> str:
    """The laptop's path to the VM (earlier tests' laptops may be peers too, offline)."""
    peers = [p for p in laptop.status().get("peers") or [] if p["name"] == HOSTNAME]
    return str(peers[0].get("path")) if peers else ""


def _both(vm: Vm, laptop: Laptop, key: str, want: tuple[str, str], what: str, timeout: float) -> None:
    def reached() -> bool:
        return _laptop_path(laptop) == want[0] and str(_vm_peer(vm, key).get("path")) == want[1]

    try:
        wait_for(reached, timeout, what, interval=2)
    except Exception as e:
        raise AssertionError(
            f"{e}: laptop {_laptop_path(laptop)!r}, VM {_vm_peer(vm, key).get('path')!r}\n"
            f"laptop's log: {laptop.log()[-3000:]}"
        ) from None


def _pings(laptop: Laptop, target: str) -> bool:
    return laptop.vm.net.client.ping(target, count=3, interval=0.3)[1] > 0


def test_image_reach_checks_beside_kernel_wireguard_pick_the_direct_path_and_kick(vm: Vm) -> None:
    net = vm.net
    assert "wireguard" in vm.out("ip -d link show meshpi0")  # the kernel's, not wireguard-go
    laptop = Laptop(vm, "pathtest", PORT).start()
    try:
        laptop.up()
        key = laptop.status()["self"]["public_key"]
        vm_mesh = str(json.loads(vm.out("meshpi status --json"))["self"]["addresses"][0])
        direct = (f"direct {VM_V4}:51820", f"direct {CLIENT_V4}:{PORT}")
        _both(vm, laptop, key, direct, "both sides direct", 120)
        checks = _vm_checks(vm)
        # Proven by checks through the kernel's port, both ways: the VM's were answered
        # by the laptop, the laptop's answered by the VM's agent.
        assert checks["sent"] > 0 and checks["proven"] > 0 and checks["answered"] > 0, checks
        assert set(checks["refused"]) >= {"malformed", "bad_integrity", "unknown_peer", "replay"}, checks
        wait_for(lambda: _pings(laptop, vm_mesh), 60, "pings laptop -> VM over the direct path", interval=1)
        assert "users:" not in vm.out("ss -ulnpH 'sport = :51820'")  # the port is still the kernel's

        net.vmnet.run(["nft", "-f", "-"], input=CUT)
        _both(vm, laptop, key, ("relayed", "relayed"), "both sides relayed after the cut", 120)
        wait_for(lambda: _pings(laptop, vm_mesh), 60, "pings laptop -> VM through the relay", interval=1)

        # No session can come while the laptop's agent (its relay proxy) is stopped:
        # the peer the VM's kernel gets back has none, and the agent kicks it.
        assert laptop.agent is not None
        os.kill(laptop.agent.pid, signal.SIGSTOP)
        try:
            kicks_before = _kicks(vm, key)
            vm.out(f"wg set meshpi0 peer {key} remove && systemctl kill -s HUP meshpi-agent.service")
            wait_for(lambda: _kicks(vm, key) > kicks_before, 60, "the VM's agent to kick the re-added peer",
                     interval=2)  # fmt: skip
        finally:
            os.kill(laptop.agent.pid, signal.SIGCONT)

        net.vmnet.run(["nft", "delete", "table", "ip", "mpimg_cut"])
        _both(vm, laptop, key, direct, "both sides direct again after the cut healed", 180)
        wait_for(lambda: _pings(laptop, vm_mesh), 60, "pings laptop -> VM direct again", interval=1)
        handshakes = dict(
            line.split("\t") for line in vm.out("wg show meshpi0 latest-handshakes").splitlines()
        )
        assert int(handshakes.get(key, "0")) > 0, handshakes
    finally:
        net.vmnet.run(["nft", "delete", "table", "ip", "mpimg_cut"], check=False)
        laptop.stop()


def _kicks(vm: Vm, key: str) -> int:
    """The VM agent's logged kicks of this peer (paths.py logs the first per endpoint)."""
    short = key[:8]
    journal = vm.out("journalctl -b -u meshpi-agent.service --no-pager -o cat")
    return sum(1 for line in journal.splitlines() if "handshake restarted with" in line and short in line)

"""A peer whose endpoint lies inside one of its own approved subnet routes, against the
Pi's kernel WireGuard in the VM (issue 12; the lab proves it beside wireguard-go in
tests/netns/test_lab_routes.py).

The laptop (10.98.0.2, in the client namespace) shares its own network 10.98.0.0/24
and control approves it: the VM routes 10.98.0.0/24 into the tunnel, and the laptop's
WireGuard endpoint 10.98.0.2 lies inside it. The route lives in meshpi's table behind
the `not fwmark` rule, so the kernel's WireGuard packets (marked) take main and reach
the endpoint, everything else to 10.98.0.0/24 goes to the laptop through the tunnel.

The laptop uses the VM as its exit node too: its traffic to the VM then comes through
the tunnel, as the VM's answers to 10.98.0.2 do, and the laptop's control connection
keeps working (without it, the VM would answer the laptop's plain TCP through a tunnel
the laptop accepts nothing but mesh addresses from).
"""

from __future__ import annotations

import os

import pytest

from tests.image.machine import HOSTNAME, MESHPI, Laptop, Vm, node_id
from tests.image.vmnet import CLIENT_V4
from tests.lab.host import wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1", reason="boots the image under qemu: set MESHPI_IMAGE_TESTS=1"
)

LAPTOP_NET = "10.98.0.0/24"  # the laptop's own network: its endpoint is inside
FWMARK = "0xca6c"  # prefs.fwmark 51820, on WireGuard's own packets
PORT = 51821


def _vm_peer(vm: Vm, key: str) -> tuple[str, int]:
    """The VM kernel's (endpoint, latest handshake) for the peer with `key`."""
    endpoints = dict(line.split("\t") for line in vm.out("wg show meshpi0 endpoints").splitlines())
    handshakes = dict(line.split("\t") for line in vm.out("wg show meshpi0 latest-handshakes").splitlines())
    return endpoints.get(key, "(none)"), int(handshakes.get(key, "0"))


def test_image_peer_endpoint_inside_its_subnet_route_handshakes_with_kernel_wireguard(vm: Vm) -> None:
    laptop = Laptop(vm, "lansite", PORT).start()
    laptop_id = ""
    try:
        laptop.up("--advertise-routes", LAPTOP_NET)
        laptop_id = node_id(vm, "lansite")
        vm.out(f"meshpi-control routes approve {node_id(vm, HOSTNAME)} 0.0.0.0/0 ::/0")
        vm.out(f"meshpi-control routes approve {laptop_id} {LAPTOP_NET}")
        laptop.set("--exit-node", HOSTNAME)
        wait_for(
            lambda: f"{LAPTOP_NET} dev meshpi0" in vm.out("ip route show table 51820"),
            60,
            "the laptop's network in the VM's meshpi table",
            interval=2,
        )
        assert LAPTOP_NET not in vm.out("ip route show")  # not in main
        assert "dev meshpi0" in vm.out(f"ip route get {CLIENT_V4}")  # plain packets: the tunnel
        assert "dev eth0" in vm.out(f"ip route get {CLIENT_V4} mark {FWMARK}")  # WireGuard's own: main
        assert vm.out("wg show meshpi0 fwmark") == FWMARK

        # A handshake made while the route is in place: the laptop moves to a new key,
        # which the VM's kernel has never had a session with.
        old_key = laptop.status()["self"]["public_key"]
        since = int(vm.out("date +%s"))  # the VM's clock: its handshake times are in it

        def rotated() -> bool:  # 503 while the laptop's control link reconnects
            return (
                vm.net.client.run([MESHPI, "rotate-key", *laptop.local], check=False, timeout=60).returncode
                == 0
            )

        wait_for(rotated, 90, "the laptop's key rotation", interval=3)
        new_key = laptop.status()["self"]["public_key"]
        assert new_key != old_key

        def fresh() -> bool:
            endpoint, handshake = _vm_peer(vm, new_key)
            return endpoint == f"{CLIENT_V4}:{PORT}" and handshake >= since - 5

        wait_for(fresh, 90, "a handshake under the laptop's new key, direct to 10.98.0.2", interval=2)
        wait_for(
            lambda: old_key not in vm.out("wg show meshpi0 peers"),
            60,
            "the old key to leave the VM",
            interval=2,
        )
        # Traffic both ways: the laptop's internet through the VM, the VM to the laptop.
        wait_for(laptop.via_vm, 60, "the laptop's traffic to leave through the VM", interval=1)
        mesh_v4 = next(a.split("/")[0] for a in laptop.status()["self"]["addresses"] if ":" not in a)
        ping = vm.ssh(f"ping -n -c 3 -i 0.5 -W 2 {mesh_v4}", check=False)
        assert " 0% packet loss" in ping.stdout, ping.stdout
        endpoint, _ = _vm_peer(vm, new_key)
        assert endpoint == f"{CLIENT_V4}:{PORT}", endpoint  # direct, never the relay's 127.0.0.1
    finally:
        laptop.stop()
        if laptop_id:
            vm.ssh(f"meshpi-control nodes remove {laptop_id}", check=False)
            wait_for(
                lambda: LAPTOP_NET not in vm.out("ip route show table 51820"),
                60,
                "the laptop's network to leave the VM's table",
                interval=2,
            )

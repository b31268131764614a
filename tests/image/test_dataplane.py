"""The exit node's fast paths on the image's own kernel (issue 14): Debian's arm64
kernel has nf_flow_table, so the agent's table holds the flowtable and offloads from
to_mesh; virtio-net lets rx-udp-gro-forwarding change, so the uplink has it on. Both
are what status `dataplane` says. The speed they give is scripts/bench/dataplane's
business, not a test's."""

from __future__ import annotations

import json
import os

import pytest

from tests.image.machine import Vm

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1", reason="boots the image under qemu: set MESHPI_IMAGE_TESTS=1"
)


def test_image_exit_node_uses_the_flowtable_and_udp_gro_forwarding(vm: Vm) -> None:
    dataplane = json.loads(vm.out("meshpi status --json"))["dataplane"]
    assert dataplane["uplinks"] == ["eth0"], dataplane
    assert dataplane["flowtable_supported"] is True, dataplane
    assert dataplane["flowtable"] is True, dataplane
    assert dataplane["udp_gro_forwarding"] == ["eth0"], dataplane
    table = vm.out("nft list table inet meshpi")
    assert "flowtable fastpath" in table and "flow add @fastpath" in table, table
    assert "rx-udp-gro-forwarding: on" in vm.out(
        "/opt/meshpi/bin/python -c 'from appliance.kernel.offload import WithFeatures; "
        "from appliance.kernel.sysctl import ProcFs; "
        'print("rx-udp-gro-forwarding:", WithFeatures(ProcFs()).read("ethtool.eth0.rx-udp-gro-forwarding"))\''
    )

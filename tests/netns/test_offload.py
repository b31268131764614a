"""The fast paths on the real kernel (kernel/offload.py), inside a throwaway namespace:

    eth0 <==veth==> eth0p     eth0 192.168.77.2/24, default route via .1 (the uplink)

UDP GRO forwarding is a netdev feature every veth lets change: the exit node turns
it on for its uplink and `down` puts back what was there. Whether nft flowtables
exist depends on the kernel (this CI host: no; the image's arm64 kernel: yes): the
probe's answer must agree with what the kernel accepts, and the agent's table
must apply either way.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.agent.reconcile import Reconciler
from appliance.core.model import Scope, State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from appliance.kernel.base import InterfaceNotFound
from appliance.kernel.offload import KernelOffloads, WithFeatures
from appliance.kernel.real import real_system
from appliance.kernel.sysctl import ProcFs
from appliance.kernel.system import System
from tests.netns.kernelstate import sh, snapshot
from tests.unit.meshes import KEYS, pi_netmap

IFACE = f"mpo{os.getpid() % 100000}"
GRO = "ethtool.eth0.rx-udp-gro-forwarding"


@pytest.fixture
def system(inside: str, tmp_path: Path) -> Iterator[System]:
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "link", "set", "eth0p", "up")
    sh("ip", "link", "set", "eth0", "up")
    sh("ip", "addr", "add", "192.168.77.2/24", "dev", "eth0")
    sh("ip", "route", "add", "default", "via", "192.168.77.1")
    yield real_system("userspace", tmp_path)
    subprocess.run(["ip", "link", "del", IFACE], capture_output=True)


def test_offload_facts_name_the_uplink_and_its_udp_gro(system: System) -> None:
    facts = system.facts(Scope(IFACE, 51820, 51820))
    assert facts.uplinks == ("eth0",)
    assert facts.udp_gro == ("eth0",)  # a veth lets rx-udp-gro-forwarding change


def test_offload_feature_reads_and_writes_through_ethtool(inside: str) -> None:
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    features = WithFeatures(ProcFs())
    assert features.read(GRO) == "off"
    features.write(GRO, "on")
    assert features.read(GRO) == "on"
    features.write(GRO, "off")
    assert features.read(GRO) == "off"
    assert features.read("net.ipv4.ip_forward") == "0"  # sysctls pass through
    with pytest.raises(InterfaceNotFound):
        features.read("ethtool.nosuch0.rx-udp-gro-forwarding")


def test_offload_exit_node_sets_udp_gro_and_down_restores_it(system: System) -> None:
    before = snapshot()
    prefs = Prefs(interface=IFACE, backend="userspace", advertise_exit_node=True,
                  advertise_routes=(ip_network("192.168.77.0/24"),))  # fmt: skip
    scope = Scope(IFACE, prefs.table, prefs.fwmark)
    facts = system.facts(scope)
    desired = plan(pi_netmap(), prefs, KEYS["pi"], facts)
    Reconciler(system, scope).sync(desired)
    assert Reconciler(system, scope).sync(desired, reread=True) == []
    assert system.sysctls.managed()[GRO] == "on"
    ruleset = sh("nft", "list", "table", "inet", "meshpi")
    assert ("flow add @fastpath" in ruleset) == facts.flowtable
    Reconciler(system, scope).sync(State(), reread=True)
    assert WithFeatures(ProcFs()).read(GRO) == "off"
    assert snapshot() == before


def test_offload_flowtable_probe_agrees_with_the_kernel(system: System) -> None:
    """Where the probe says no, the table with a flowtable is refused (and the agent
    plans none); where it says yes, the kernel takes it and offloads from to_mesh."""
    supported = KernelOffloads().flowtable()
    prefs = Prefs(interface=IFACE, backend="userspace", advertise_exit_node=True)
    scope = Scope(IFACE, prefs.table, prefs.fwmark)
    facts = replace(system.facts(scope), flowtable=True)  # as if the probe said yes
    desired = plan(pi_netmap(), prefs, KEYS["pi"], facts)
    reconciler = Reconciler(system, scope)
    if supported:
        reconciler.sync(desired)
        assert "flowtable fastpath" in sh("nft", "list", "table", "inet", "meshpi")
    else:
        with pytest.raises(Exception, match="fastpath"):
            reconciler.sync(desired)
    reconciler.sync(State(), reread=True)

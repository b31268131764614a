"""Golden listings of the fake kernel after a sequence of states, in the style of
Tailscale's TestRouterStates: plan → diff → apply through the real System code,
then compare the fake kernel's whole state, as text, with a reviewed file.

Regenerate after an intended change with UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import logging
import os
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.agent.reconcile import Reconciler
from appliance.base.keys import PrivateKey
from appliance.core.model import HostFacts, Scope, State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from appliance.kernel.fake import FakeKernel, fake_system
from appliance.wire.netmap import Netmap
from tests.unit.meshes import KEYS, LAPTOP_FACTS, PI_FACTS, laptop_netmap, pi_netmap

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs; rerun with UPDATE_GOLDEN=1 and review"


def _steps(
    tmp_path: Path, key: PrivateKey, facts: HostFacts, steps: list[tuple[str, Netmap, Prefs]]
) -> FakeKernel:
    kernel = FakeKernel(connected=facts.connected)
    system, kernel = fake_system(tmp_path, kernel)
    before = kernel.render()
    reconciler = None
    for name, netmap, prefs in steps:
        scope = Scope(prefs.interface, prefs.table, prefs.fwmark)
        reconciler = reconciler or Reconciler(system, scope)
        desired = plan(netmap, prefs, key, system.facts(scope))
        reconciler.sync(desired)
        check_golden(name, kernel.render())
        # The kernel now reads back as exactly what was wanted.
        assert Reconciler(system, scope).sync(desired, reread=True) == []
    assert reconciler is not None
    reconciler.sync(State(), reread=True)
    assert kernel.render() == before, "down must leave the kernel as it was found"
    return kernel


def test_golden_exit_node_pi(tmp_path: Path) -> None:
    lan = ip_network("192.168.77.0/24")
    full = Prefs(advertise_exit_node=True, advertise_routes=(lan,))
    _steps(
        tmp_path,
        KEYS["pi"],
        PI_FACTS,
        [
            ("pi_1_exit_and_lan", pi_netmap(), full),
            ("pi_2_second_peer", pi_netmap(peers=("laptop", "phone")), full),
            (
                "pi_3_lan_not_shared",
                pi_netmap(peers=("laptop", "phone")),
                Prefs(advertise_exit_node=True),
            ),
            ("pi_4_plain_node", pi_netmap(peers=("laptop", "phone")), Prefs()),
        ],
    )


def test_golden_exit_node_client_laptop(tmp_path: Path) -> None:
    base = Prefs(interface="meshpi1")
    _steps(
        tmp_path,
        KEYS["laptop"],
        LAPTOP_FACTS,
        [
            ("laptop_1_plain", laptop_netmap(), base),
            ("laptop_2_exit_via_pi", laptop_netmap(), base.with_changes(exit_node="pi")),
            (
                "laptop_3_allow_lan",
                laptop_netmap(),
                base.with_changes(exit_node="pi", exit_node_allow_lan_access=True),
            ),
            ("laptop_4_mtu_1420", laptop_netmap(), base.with_changes(exit_node="pi", mtu=1420)),
        ],
    )


def test_golden_one_log_line_per_change_and_no_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    system, _ = fake_system(tmp_path)
    scope = Scope("meshpi0", 51820, 51820)
    desired = plan(pi_netmap(), Prefs(advertise_exit_node=True), KEYS["pi"], system.facts(scope))
    with caplog.at_level(logging.INFO):
        applied = Reconciler(system, scope).sync(desired)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[#]")]
    assert lines == [f"[#] {c}" for c in applied]
    assert KEYS["pi"].secret_base64() not in caplog.text


def test_golden_appliance_input_policy(tmp_path: Path) -> None:
    """The appliance guards its dashboard (LAN only, the mesh when allowed) and SSH
    (LAN and mesh); a node that only guards its ports has a table without forwarding."""
    appliance = Prefs(advertise_exit_node=True, dashboard_port=80, ssh_port=22)
    _steps(
        tmp_path,
        KEYS["pi"],
        PI_FACTS,
        [
            ("pi_5_appliance_input", pi_netmap(peers=("laptop", "phone")), appliance),
            (
                "pi_6_dashboard_from_mesh",
                pi_netmap(peers=("laptop", "phone")),
                appliance.with_changes(dashboard_from_mesh=True),
            ),
            ("pi_7_input_only", pi_netmap(peers=("laptop", "phone")), Prefs(dashboard_port=80)),
        ],
    )

from dataclasses import replace
from ipaddress import ip_network

from appliance.base.net import Endpoint
from appliance.core.changes import (
    AddPeer,
    AddRule,
    ConfigureDevice,
    CreateInterface,
    DeleteInterface,
    DeleteNft,
    RemovePeer,
    RemoveRule,
    ReplaceNft,
    RestoreSysctl,
    SetMtu,
    SetSysctl,
    UpdatePeer,
)
from appliance.core.diff import diff
from appliance.core.model import State
from appliance.core.planner import plan
from appliance.core.prefs import Prefs
from tests.unit.meshes import KEYS, LAPTOP_FACTS, PI_FACTS, laptop_netmap, pi_netmap

PI_PREFS = Prefs(advertise_exit_node=True, advertise_routes=(ip_network("192.168.77.0/24"),))


def _pi(**prefs: object) -> State:
    return plan(pi_netmap(peers=("laptop", "phone")), PI_PREFS.with_changes(**prefs), KEYS["pi"], PI_FACTS)


def test_diff_nothing_changed_means_no_changes() -> None:
    assert diff(_pi(), _pi()) == []
    assert diff(State(), State()) == []


def test_diff_from_nothing_builds_in_safe_order() -> None:
    changes = diff(State(), _pi())
    kinds = [type(c).__name__ for c in changes]
    assert kinds[:2] == ["CreateInterface", "ConfigureDevice"]
    # The firewall exists before forwarding is switched on.
    assert kinds.index("ReplaceNft") < min(i for i, c in enumerate(changes) if isinstance(c, SetSysctl))
    assert not [c for c in changes if type(c).__name__.startswith(("Remove", "Delete"))]


def test_diff_teardown_removes_rules_restores_sysctls_then_deletes_interface() -> None:
    laptop = plan(laptop_netmap(), Prefs(exit_node="pi"), KEYS["laptop"], LAPTOP_FACTS)
    changes = diff(laptop, State())
    kinds = [type(c) for c in changes]
    assert kinds[-1] is DeleteInterface
    assert set(kinds) == {RemoveRule, RestoreSysctl, DeleteInterface}  # routes go with the link
    assert max(i for i, k in enumerate(kinds) if k is RemoveRule) < kinds.index(RestoreSysctl)


def test_diff_one_peer_changed_is_one_change() -> None:
    before = _pi()
    phone = next(p for p in before.peers.values() if p.name == "phone")
    moved = replace(phone, endpoint=Endpoint(ip_network("203.0.113.7/32").network_address, 4242))
    after = replace(before, peers={**before.peers, phone.public_key: moved})
    assert diff(before, after) == [UpdatePeer("meshpi0", moved)]


def test_diff_peer_without_endpoint_keeps_roamed_endpoint() -> None:
    desired = _pi()
    laptop = next(p for p in desired.peers.values() if p.name == "laptop")
    roamed = replace(laptop, endpoint=Endpoint(ip_network("192.0.2.1/32").network_address, 40000))
    current = replace(desired, peers={**desired.peers, laptop.public_key: roamed})
    assert diff(current, desired) == []


def test_diff_add_before_delete() -> None:
    before = _pi()
    after = plan(pi_netmap(peers=("laptop", "office")), PI_PREFS, KEYS["pi"], PI_FACTS)
    changes = diff(before, after)
    assert [type(c) for c in changes] == [AddPeer, RemovePeer]
    assert changes[1] == RemovePeer("meshpi0", KEYS["phone"].public_key(), "phone")


def test_diff_turning_exit_node_off_replaces_firewall_and_keeps_forwarding() -> None:
    changes = diff(_pi(), _pi(advertise_exit_node=False))
    assert [type(c) for c in changes] == [ReplaceNft]


def test_diff_no_longer_forwarding_restores_sysctls_and_deletes_table() -> None:
    changes = diff(_pi(), _pi(advertise_exit_node=False, advertise_routes=()))
    assert {type(c) for c in changes} == {RestoreSysctl, DeleteNft}
    assert {c.key for c in changes if isinstance(c, RestoreSysctl)} == {
        "net.ipv4.ip_forward",
        "net.ipv6.conf.all.forwarding",
    }


def test_diff_mtu_and_port_changes_touch_the_device_only() -> None:
    changes = diff(_pi(), _pi(mtu=1420, listen_port=41641))
    assert [type(c) for c in changes] == [
        SetMtu,
        ConfigureDevice,
        ReplaceNft,
    ]  # nft: clamp follows mtu


def test_diff_renamed_interface_is_recreated_then_old_one_deleted() -> None:
    changes = diff(_pi(), _pi(interface="mesh7"))
    assert isinstance(changes[0], CreateInterface) and changes[0].name == "mesh7"
    assert changes[-1] == DeleteInterface("meshpi0")


def test_diff_using_an_exit_node_adds_rules_last() -> None:
    plain = plan(laptop_netmap(), Prefs(), KEYS["laptop"], LAPTOP_FACTS)
    exiting = plan(laptop_netmap(), Prefs(exit_node="pi"), KEYS["laptop"], LAPTOP_FACTS)
    changes = diff(plain, exiting)
    rule_positions = [i for i, c in enumerate(changes) if isinstance(c, AddRule)]
    assert rule_positions == list(range(len(changes) - len(rule_positions), len(changes)))


def test_diff_log_lines_never_show_a_private_key() -> None:
    secret = KEYS["pi"].secret_base64()
    for change in diff(State(), _pi()):
        assert secret not in str(change) and secret not in repr(change)

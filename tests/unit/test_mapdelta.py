import pytest

from appliance.wire.fields import ConfigError
from appliance.wire.mapdelta import delta_json, patched
from appliance.wire.netmap import netmap_json, parse_netmap
from tests.unit.meshes import KEYS, node
from tests.unit.meshes import netmap_json as raw_netmap


def _pi_view() -> object:
    return parse_netmap(raw_netmap("pi", [node("laptop"), node("phone")], ["0.0.0.0/0", "::/0"]))


def test_mapdelta_round_trip_of_a_full_netmap() -> None:
    netmap = _pi_view()
    assert parse_netmap(netmap_json(netmap)) == netmap  # type: ignore[arg-type]


def test_mapdelta_changed_removed_and_added() -> None:
    netmap = _pi_view()
    moved = parse_netmap(
        raw_netmap("pi", [node("laptop", endpoint="192.0.2.1:4242")], ["0.0.0.0/0", "::/0"])
    ).peers[0]
    office = parse_netmap(raw_netmap("pi", [node("office")])).peers[0]
    delta = delta_json([moved, office], [KEYS["phone"].public_key()])
    after = patched(netmap, delta)  # type: ignore[arg-type]
    assert [p.name for p in after.peers] == ["laptop", "office"]
    assert str(after.peers[0].endpoint) == "192.0.2.1:4242"
    assert after.self_node == netmap.self_node  # type: ignore[attr-defined]


def test_mapdelta_empty_delta_changes_nothing() -> None:
    netmap = _pi_view()
    assert patched(netmap, {"changed": [], "removed": []}) == netmap  # type: ignore[arg-type]


def test_mapdelta_bad_delta_is_refused_with_the_field() -> None:
    netmap = _pi_view()
    with pytest.raises(ConfigError) as e:
        patched(netmap, {"changed": [node("office") | {"addresses": ["1.2.3.4"]}]})  # type: ignore[arg-type]
    assert "outside the mesh range" in str(e.value)
    with pytest.raises(ConfigError) as e:
        # A changed peer may not take an address another peer holds.
        patched(netmap, {"changed": [node("office") | {"addresses": ["100.64.0.2"]}]})  # type: ignore[arg-type]
    assert "already used by" in str(e.value)
    with pytest.raises(ConfigError):
        patched(netmap, {"removed": ["junk"]})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        patched(netmap, {"changed": [], "surprise": 1})  # type: ignore[arg-type]

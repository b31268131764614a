"""Bad netmaps and prefs are refused with the file, field and value named."""

import json
from pathlib import Path

import pytest

from appliance.core.prefs import Prefs, dump_prefs, load_prefs, parse_prefs
from appliance.wire.fields import ConfigError
from appliance.wire.netmap import load_netmap, parse_netmap
from tests.unit.meshes import MESH, netmap_json, node


def _err(obj: object) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_netmap(obj, "nm.json")
    return e.value


def test_inputs_netmap_bad_key_names_field_and_value() -> None:
    peer = node("laptop") | {"public_key": "not-a-key"}
    e = _err(netmap_json("pi", [peer]))
    assert (e.source, e.field, e.value) == ("nm.json", "peers[0].public_key", "not-a-key")
    assert str(e) == "nm.json: peers[0].public_key: 'not-a-key' is not base64"


def test_inputs_netmap_duplicate_address() -> None:
    peer = node("laptop") | {"addresses": ["100.64.0.1"]}
    e = _err(netmap_json("pi", [peer]))
    assert e.field == "peers[0].addresses[0]" and e.value == "100.64.0.1"
    assert "already used by pi" in str(e)


def test_inputs_netmap_duplicate_key_and_name() -> None:
    e = _err(netmap_json("pi", [node("laptop"), node("laptop")]))
    assert e.field == "peers[1].name"


def test_inputs_netmap_unknown_field() -> None:
    e = _err(netmap_json("pi", [node("laptop") | {"colour": "blue"}]))
    assert e.field == "peers[0].colour" and "unknown field" in str(e)


def test_inputs_netmap_address_outside_mesh() -> None:
    e = _err(netmap_json("pi", [node("laptop") | {"addresses": ["10.0.0.1"]}]))
    assert e.field == "peers[0].addresses[0]" and "outside the mesh range" in str(e)


def test_inputs_netmap_bad_endpoint_and_route() -> None:
    e = _err(netmap_json("pi", [node("laptop") | {"endpoint": "example.org:51820"}]))
    assert e.field == "peers[0].endpoint"
    e = _err(netmap_json("pi", [node("laptop") | {"routes": ["10.1.2.3/16"]}]))
    assert e.field == "peers[0].routes[0]" and "did you mean 10.1.0.0/16" in str(e)


def test_inputs_netmap_v6_endpoint() -> None:
    nm = parse_netmap(netmap_json("pi", [node("laptop", endpoint="[2001:db8::1]:51820")]))
    assert str(nm.peers[0].endpoint) == "[2001:db8::1]:51820"


def test_inputs_netmap_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "netmap.json"
    path.write_text('{"mesh": {"ipv4": "100.64.0.0/10",,}}')
    with pytest.raises(ConfigError) as e:
        load_netmap(path)
    assert e.value.source == str(path) and e.value.field == "line 1 column 35"
    assert "not valid JSON" in str(e.value)


def test_inputs_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_netmap(tmp_path / "nope.json")


def test_inputs_mesh_must_be_v4_and_v6() -> None:
    e = _err({"mesh": {"ipv4": MESH["ipv6"], "ipv6": MESH["ipv6"]}})
    assert e.field == "mesh.ipv4" and "IPv4" in str(e)


@pytest.mark.parametrize(
    ("prefs", "field"),
    [
        ({"mtu": 100}, "mtu"),
        ({"listen_port": 0}, "listen_port"),
        ({"listen_port": "51820"}, "listen_port"),
        ({"advertise_routes": ["0.0.0.0/0"]}, "advertise_routes[0]"),
        ({"advertise_routes": "10.0.0.0/8"}, "advertise_routes"),
        ({"interface": "a-very-long-interface-name"}, "interface"),
        ({"backend": "magic"}, "backend"),
        ({"table": 254}, "table"),
        ({"advertise_exit_node": "yes"}, "advertise_exit_node"),
        ({"exitnode": "pi"}, "exitnode"),
    ],
)
def test_inputs_prefs_rejects(prefs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_prefs(prefs, "prefs.json")
    assert e.value.field == field
    assert repr(e.value.value) in str(e.value)


def test_inputs_prefs_round_trip(tmp_path: Path) -> None:
    prefs = parse_prefs(
        {"advertise_exit_node": True, "advertise_routes": ["192.168.1.0/24"], "exit_node": None}
    )
    path = tmp_path / "prefs.json"
    path.write_text(dump_prefs(prefs))
    assert load_prefs(path) == prefs
    assert json.loads(path.read_text())["advertise_routes"] == ["192.168.1.0/24"]
    assert parse_prefs({}) == Prefs()


def test_inputs_private_key_is_clamped_like_the_kernel_stores_it() -> None:
    from appliance.base.keys import PrivateKey

    loose = PrivateKey(bytes([0xFF]) * 32)
    assert loose.raw[0] == 0xF8 and loose.raw[31] == 0x7F
    assert PrivateKey(loose.raw) == loose
    assert loose.public_key() == PrivateKey(bytes([0xFF]) * 32).public_key()

"""The shared full-map encoding (control/mapcache.py) against the per-node one
(mapper.full_map + seal.encode_json): byte for byte, for every viewer, capability
version and chunking; and what a node must never see through it."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from ipaddress import ip_address, ip_network

import pytest
from nacl.public import Box, PrivateKey

from appliance.base.keys import PrivateKey as WgKey
from appliance.control.mapcache import MapCache
from appliance.control.mapper import full_map
from appliance.control.store_records import DeviceRecord, NodeRecord, NodeState, address_pair
from appliance.wire import mapzip
from appliance.wire.dnsname import DnsConfig, LanDns
from appliance.wire.netmap import CAPVER, parse_netmap
from appliance.wire.seal import b64, encode_json
from tests.unit.test_mapper import MESH, NOW, record

DNS = DnsConfig("mesh.test")
LAN, OTHER = ip_network("192.168.77.0/24"), ip_network("10.9.0.0/16")
EXIT = ip_network("0.0.0.0/0")
SECRET_DEVICE = WgKey(bytes([200]) * 32).public_key()


def device(i: int) -> DeviceRecord:
    v4, v6 = address_pair(MESH, 1000 + i)
    return DeviceRecord(f"phone{i}", WgKey(bytes([150 + i]) * 32).public_key(), 1000 + i, v4, v6, f"phone{i}")


def mesh_records() -> list[NodeRecord]:
    """Every kind of node a viewer must see, or must not, or must see only in part."""
    return [
        # a subnet router: the exit route advertised, not approved; a LAN approved;
        # another approved but no longer advertised; split DNS for an unserved resolver
        record(
            1,
            "pi",
            advertised_routes=(EXIT, LAN),
            approved_routes=(LAN, OTHER),
            endpoints=(),
            dns_name="pi",
            devices=(device(1),),
            advertised_dns=LanDns(("corp.test",), ip_address("10.9.0.53")),
        ),  # fmt: skip
        record(2, "laptop", dns_name="laptop"),
        record(3, "stranger", state=NodeState.PENDING, ipv4=None, ipv6=None, address_index=None),
        record(4, "old", key_expiry=NOW - timedelta(days=1), dns_name="old"),
        record(5, "appliance", key_expiry=NOW - timedelta(days=1), expiry_exempt=True, dns_name="appliance"),
        record(6, "soon", key_expiry=NOW + timedelta(hours=1), dns_name="soon"),
        record(7, "hub", dns_name="hub", devices=(device(2), replace(device(3), public_key=SECRET_DEVICE))),
    ] + [record(i, f"n{i}", dns_name=f"n{i}") for i in range(8, 20)]


def reference(viewer: NodeRecord, records: list[NodeRecord], version: int, capver: int, re: str) -> bytes:
    """Today's per-node path, as app.py sealed it before the cache."""
    full = full_map(MESH, viewer, records, NOW, capver, DNS)
    return encode_json({"re": re, "body": {"version": version, "full": full}})


def visible_viewers(records: list[NodeRecord]) -> list[NodeRecord]:
    return [r for r in records if r.state is NodeState.APPROVED and not r.key_expired(NOW)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
@pytest.mark.parametrize("capver", [1, 2, 3, CAPVER])
def test_mapcache_answers_are_byte_for_byte_the_per_node_ones(chunk: int, capver: int) -> None:
    records = mesh_records()
    cache = MapCache(chunk)
    re = b64(b"n" * 24)
    for viewer in visible_viewers(records):
        full = cache.full(MESH, viewer, 42, records, NOW, capver, DNS)
        want = reference(viewer, records, 42, capver, re)
        assert full.plaintext(re) == want, viewer.name
        packed = full.packed(re)
        assert mapzip.compressed(packed) and mapzip.inflate(packed) == want, viewer.name
        assert full == json.loads(want)["body"]["full"]  # the Mapping view, for in-process callers
    assert cache.builds == 1  # one encoding for every viewer


def test_mapcache_a_node_sees_only_what_mapper_lets_it_see() -> None:
    records = mesh_records()
    cache = MapCache(2)
    for viewer in visible_viewers(records):
        for capver in (1, CAPVER):
            full = cache.full(MESH, viewer, 7, records, NOW, capver, DNS)
            text = mapzip.inflate(full.packed("x"))
            netmap = parse_netmap(json.loads(text)["body"]["full"])
            names = [p.name for p in netmap.peers]
            assert viewer.name not in names and netmap.self_node.name == viewer.name
            assert "stranger" not in names and "old" not in names  # pending, key expired
            assert b"stranger" not in text and b'"old"' not in text
            pi = netmap.find_peer("pi") or netmap.self_node
            assert EXIT not in pi.routes and OTHER not in pi.routes  # advertised only / approved only
            assert LAN in pi.routes and pi.lan_dns is None  # its resolver is in no served route
            # hosted devices: their names and addresses, never their keys
            for key in [SECRET_DEVICE, *(d.public_key for r in records for d in r.devices)]:
                assert str(key).encode() not in text
            assert b"corp.test" not in text and b"phone" not in text or capver >= 3


def test_mapcache_capability_versions_never_mix() -> None:
    records = mesh_records()
    cache = MapCache(4)
    viewer = records[1]
    new = cache.full(MESH, viewer, 3, records, NOW, CAPVER, DNS).plaintext("r")
    old = cache.full(MESH, viewer, 3, records, NOW, 1, DNS).plaintext("r")
    assert b'"endpoints"' in new and b'"devices"' in new
    for field in (b'"endpoints"', b'"devices"', b'"dns"', b'"capver"', b'"dns_name"'):
        assert field not in old
    assert not cache.full(MESH, viewer, 3, records, NOW, 3, DNS).compressed
    assert cache.full(MESH, viewer, 3, records, NOW, CAPVER, DNS).compressed


def test_mapcache_follows_versions_and_the_clock() -> None:
    records = mesh_records()
    cache = MapCache(3)
    laptop = records[1]
    first = cache.full(MESH, laptop, 1, records, NOW, CAPVER, DNS)
    assert "soon" in [p["name"] for p in first["peers"]]
    # same version, later: "soon"'s key has expired, with no version between
    later = NOW + timedelta(hours=2)
    after = cache.full(MESH, laptop, 1, records, later, CAPVER, DNS)
    assert "soon" not in [p["name"] for p in after["peers"]]
    assert after.plaintext("r") == encode_json(
        {"re": "r", "body": {"version": 1, "full": full_map(MESH, laptop, records, later, CAPVER, DNS)}}
    )
    # a new version: an approved route shows, a removed node goes
    changed = [replace(records[0], approved_routes=(LAN, EXIT), version=2)] + records[1:-1]
    now = cache.full(MESH, laptop, 2, changed, NOW, CAPVER, DNS)
    assert now.plaintext("r") == reference(laptop, changed, 2, CAPVER, "r")
    assert mapzip.inflate(now.packed("r")) == reference(laptop, changed, 2, CAPVER, "r")
    assert cache.builds == 3


def test_mapcache_unchanged_chunks_are_not_compressed_again() -> None:
    records = [record(i, f"n{i}") for i in range(1, 41)]
    cache = MapCache(8)
    cache.full(MESH, records[0], 1, records, NOW, CAPVER, DNS).packed("r")
    before = {k: v[1] for k, v in cache._chunks.items()}
    changed = list(records)
    changed[20] = replace(records[20], endpoints=(), name="renamed", version=2)
    full = cache.full(MESH, records[0], 2, changed, NOW, CAPVER, DNS)
    assert mapzip.inflate(full.packed("r")) == reference(records[0], changed, 2, CAPVER, "r")
    same = [k for k, v in cache._chunks.items() if before.get(k) is v[1]]
    assert sorted(k[1] for k in same) == [0, 1, 3, 4]  # only chunk 2 (entries 16-23) was redone


def test_mapcache_edges_a_lone_node_and_its_own_chunk_first() -> None:
    alone = [record(1, "alone")]
    cache = MapCache(1)
    full = cache.full(MESH, alone[0], 1, alone, NOW, CAPVER, DNS)
    assert full["peers"] == [] and mapzip.inflate(full.packed("r")) == reference(
        alone[0], alone, 1, CAPVER, "r"
    )
    two = [record(1, "a"), record(2, "b"), record(3, "c")]
    for viewer in two:
        got = cache.full(MESH, viewer, 2, two, NOW, CAPVER, DNS)
        assert mapzip.inflate(got.packed("r")) == reference(viewer, two, 2, CAPVER, "r")


def test_mapcache_sealed_answer_opens_for_its_request_only() -> None:
    records = mesh_records() + [record(i, f"m{i}", dns_name=f"m{i}") for i in range(20, 150)]
    control, node = PrivateKey.generate(), PrivateKey.generate()
    nonce = b"q" * 24
    full = MapCache().full(MESH, records[1], 5, records, NOW, CAPVER, DNS)
    sealed = full.sealed(Box(control, node.public_key), nonce)
    plaintext = Box(node, control.public_key).decrypt(sealed)
    assert mapzip.compressed(plaintext)
    assert json.loads(mapzip.inflate(plaintext))["re"] == b64(nonce)
    assert len(sealed) < len(full.plaintext(b64(nonce))) * 0.75

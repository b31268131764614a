"""DNS names in control: a label per node and hosted device, unique across both,
stable while others come and go, renamed on request, in the netmap from capver 3
only; split DNS offers served with their route. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.base.keys import PrivateKey
from appliance.control.service import ControlService
from appliance.control.service_requests import ApiError
from appliance.control.store import NameInvalid, NodeState, Store
from appliance.wire.mapdelta import patched
from appliance.wire.netmap import parse_netmap
from tests.control.test_service import auth_key, join, machine, run
from tests.control.test_store import NOW, new_key, register


def device_key(i: int) -> object:
    return PrivateKey(bytes([100 + i]) * 32).public_key()


def test_names_collide_across_nodes_and_devices_with_suffixes(store: Store) -> None:
    pi = register(store, "pi")
    hub = store.add_device(pi.id, "Pi", new_key())  # a phone called Pi
    other = register(store, "PI.fritz.box")
    assert (pi.dns_name, hub.devices[0].dns_name, other.dns_name) == ("pi", "pi-2", "pi-3")
    assert other.name == "pi-2"  # the node name counts among nodes only, as before


def test_names_are_stable_when_others_go_and_freed_with_their_holder(store: Store) -> None:
    first, second = register(store, "desk"), register(store, "desk")
    assert (first.dns_name, second.dns_name) == ("desk", "desk-2")
    store.remove_node(first.id)
    assert store.get_node(second.id).dns_name == "desk-2"  # type: ignore[union-attr]
    assert register(store, "desk").dns_name == "desk"  # the label went with its node


def test_names_idn_becomes_punycode_and_a_bad_device_name_is_refused(store: Store) -> None:
    node = register(store, "Müller-PC")
    assert node.name == "m-ller-pc" and node.dns_name == "xn--mller-pc-65a"
    assert register(store, "😀").dns_name == "node"  # a hostname never fails registration
    with pytest.raises(NameInvalid, match=r"device name '😀😀' has no letter or digit"):
        store.add_device(node.id, "😀😀", new_key())
    assert store.get_node(node.id).devices == ()  # type: ignore[union-attr]


def test_names_pending_nodes_hold_none_until_approved(store: Store) -> None:
    waiting = store.register_node(new_key(), new_key(), "pi", NodeState.PENDING, now=NOW)
    squatted = register(store, "pi")
    assert waiting.dns_name is None and squatted.dns_name == "pi"
    assert store.approve_node(waiting.id).dns_name == "pi-2"


def test_names_rename_moves_the_label_and_takes_a_new_version(store: Store) -> None:
    pi, laptop = register(store, "pi"), register(store, "laptop")
    renamed = store.rename_node(laptop.id, "Alice's Laptop")
    assert (renamed.name, renamed.dns_name) == ("alice-s-laptop", "alice-s-laptop")
    assert renamed.version > laptop.version
    # its old label is free again; a taken one gets a suffix
    assert store.rename_node(pi.id, "laptop").dns_name == "laptop"
    assert store.rename_node(renamed.id, "laptop").dns_name == "laptop-2"
    again = store.rename_node(pi.id, "laptop")
    assert again.version == store.get_node(pi.id).version  # type: ignore[union-attr]
    with pytest.raises(NameInvalid, match=r"'\.\.\.'"):
        store.rename_node(pi.id, "...")


def test_names_device_labels_are_freed_on_removal(store: Store) -> None:
    pi = register(store, "pi")
    key = new_key()
    store.add_device(pi.id, "alice phone", key)
    store.remove_device(pi.id, key)
    assert store.add_device(pi.id, "Alice Phone", new_key()).devices[0].dns_name == "alice-phone"


def test_names_in_the_map_and_a_rename_reaches_peers_as_a_delta(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        added = await s.device(machine(1), {"action": "add", "name": "Alice Phone",
                                            "public_key": str(device_key(1))})  # fmt: skip
        assert added["dns_name"] == "alice-phone"
        full = await s.map(machine(2), {"version": None, "capver": 3})
        netmap = parse_netmap(full["full"])
        assert netmap.dns is not None and netmap.dns.domain == "mesh.internal"
        (pi,) = netmap.peers
        assert netmap.self_node.dns_name == "laptop" and pi.dns_name == "pi"
        assert [(d.dns_name, str(d.addresses[0])) for d in pi.devices] == [("alice-phone", "100.64.0.3")]
        poll = asyncio.create_task(s.map(machine(2), {"version": full["version"], "capver": 3}))
        pi_id = (await s.db(s.store.get_node_by_machine_key, machine(1))).id  # type: ignore[union-attr]
        await s.changed(s.store.rename_node, pi_id, "home")
        answer = await asyncio.wait_for(poll, 2)
        after = patched(netmap, answer["delta"])
        assert after.peers[0].dns_name == "home" and after.dns == netmap.dns
        # an agent of capver 2 sees none of it
        old = await s.map(machine(2), {"version": None, "capver": 2})
        assert "dns" not in old["full"] and "dns_name" not in old["full"]["peers"][0]

    run(tmp_path, scenario)


def test_names_split_dns_is_served_only_with_an_approved_route(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        offer = {"domains": ["Fritz.Box", "lan"], "resolver": "192.168.178.1"}
        await s.update(machine(1), {"advertise_routes": ["192.168.178.0/24"], "advertise_dns": offer})

        async def lan_dns() -> object:
            full = await s.map(machine(2), {"version": None, "capver": 3})
            return parse_netmap(full["full"]).peers[0].lan_dns

        assert await lan_dns() is None  # the route is not approved yet
        pi_id = (await s.db(s.store.get_node_by_machine_key, machine(1))).id  # type: ignore[union-attr]
        await s.changed(s.store.approve_routes, pi_id, [ip_network("192.168.178.0/24")])
        served = await lan_dns()
        assert served is not None and served.domains == ("fritz.box", "lan")  # type: ignore[attr-defined]
        await s.update(machine(1), {"advertise_routes": ["192.168.178.0/24"]})  # offer withdrawn
        assert await lan_dns() is None
        for bad in ({"domains": ["a b"], "resolver": "192.168.178.1"}, {"domains": ["lan"]}, "lan"):
            with pytest.raises(ApiError) as e:
                await s.update(machine(1), {"advertise_dns": bad})
            assert e.value.status == 400 and "advertise_dns" in e.value.message

    run(tmp_path, scenario)


def test_names_another_domain_from_the_control_flag(tmp_path: Path) -> None:
    async def main() -> None:
        from appliance.control.store import open_store

        s = ControlService(lambda: open_store(tmp_path / "c.db"), map_timeout=2, dns_domain="home.internal")
        try:
            key = await auth_key(s)
            await join(s, 1, "pi", key)
            full = await s.map(machine(1), {"version": None, "capver": 3})
            assert full["full"]["dns"] == {"domain": "home.internal"}
        finally:
            s.close()

    asyncio.run(main())

"""The control server's ops on a real SQLite store, without HTTP: registration,
approval, full map, long-poll deltas, key rotation, removal, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from appliance.base.keys import PrivateKey, PublicKey
from appliance.control.service import ControlService
from appliance.control.service_requests import ApiError
from appliance.control.store import open_store
from appliance.control.store_records import utcnow
from appliance.wire.mapdelta import patched
from appliance.wire.netmap import parse_netmap


def machine(i: int) -> PublicKey:
    return PrivateKey(bytes([200 + i]) * 32).public_key()


def nodekey(i: int) -> PublicKey:
    return PrivateKey(bytes([i]) * 32).public_key()


def run(tmp_path: Path, scenario: Callable[[ControlService], Awaitable[None]]) -> None:
    async def main() -> None:
        service = ControlService(lambda: open_store(tmp_path / "control.db"), map_timeout=2, batch=0.02)
        try:
            await scenario(service)
        finally:
            service.close()

    asyncio.run(main())


async def join(service: ControlService, i: int, name: str, auth: str | None) -> dict[str, Any]:
    body = {"node_key": str(nodekey(i)), "hostname": name, "auth_key": auth}
    return await service.register(machine(i), body)


async def auth_key(service: ControlService, reusable: bool = True) -> str:
    _, secret = await service.db(service.store.create_preauth_key, reusable, utcnow() + timedelta(hours=1))
    return secret


def test_service_join_with_auth_key_and_see_each_other(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        pi = await join(s, 1, "pi", key)
        laptop = await join(s, 2, "laptop", key)
        assert pi["state"] == laptop["state"] == "approved"
        assert pi["addresses"] != laptop["addresses"]
        assert await join(s, 2, "laptop", key) == laptop  # idempotent
        full = await s.map(machine(2), {"version": None})
        netmap = parse_netmap(full["full"])
        assert netmap.self_node.name == "laptop" and [p.name for p in netmap.peers] == ["pi"]

    run(tmp_path, scenario)


def test_service_long_poll_gets_a_delta_for_a_change(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        first = await s.map(machine(2), {"version": None})
        netmap = parse_netmap(first["full"])
        poll = asyncio.create_task(s.map(machine(2), {"version": first["version"]}))
        await asyncio.sleep(0.05)
        assert not poll.done()
        await s.update(
            machine(1),
            {
                "endpoints": ["198.51.100.1:51820"],
                "advertise_exit_node": True,
                "advertise_routes": ["192.168.77.0/24"],
            },
        )
        pi_id = (await s.db(s.store.get_node_by_machine_key, machine(1))).id  # type: ignore[union-attr]
        await s.changed(s.store.approve_routes, pi_id, [ip_network("0.0.0.0/0"), ip_network("::/0")])
        answer = await asyncio.wait_for(poll, 2)
        assert "delta" in answer and answer["version"] > first["version"]
        netmap = patched(netmap, answer["delta"])
        if not netmap.peers[0].routes:
            # The two changes came further apart than the batch window (a loaded
            # machine): the approval is the next poll's delta, at once.
            answer = await asyncio.wait_for(s.map(machine(2), {"version": answer["version"]}), 2)
            assert "delta" in answer, answer
            netmap = patched(netmap, answer["delta"])
        pi = netmap.peers[0]
        assert str(pi.endpoint) == "198.51.100.1:51820"
        # The LAN route is advertised but not approved: not served.
        assert [str(r) for r in pi.routes] == ["0.0.0.0/0", "::/0"]
        # Nothing more: the next poll times out with a keepalive.
        idle = await s.map(machine(2), {"version": answer["version"]})
        assert idle == {"version": answer["version"], "keepalive": True}

    run(tmp_path, scenario)


def test_service_version_ahead_of_the_mesh_gets_a_full_map(tmp_path: Path) -> None:
    """An agent keeps its map version across reconnects; a control whose database
    went back (restored from an older copy) must not hold it on a version it never
    reached: a full map, at once."""

    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        first = await s.map(machine(2), {"version": None})
        same = await s.map(machine(2), {"version": first["version"]})
        assert same == {"version": first["version"], "keepalive": True}
        fulls = s.metrics.full_maps_sent
        ahead = await asyncio.wait_for(s.map(machine(2), {"version": first["version"] + 50}), 1)
        assert ahead["version"] == first["version"] and "full" in ahead
        assert parse_netmap(ahead["full"]).self_node.name == "laptop"
        assert s.metrics.full_maps_sent == fulls + 1

    run(tmp_path, scenario)


def test_service_knows_approved_machines_without_a_query(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 3, "stranger", None)  # pending
        assert s.is_approved(machine(1).raw)
        assert not s.is_approved(machine(3).raw) and not s.is_approved(machine(9).raw)

    run(tmp_path, scenario)


def test_service_pending_node_needs_approval(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        reg = await join(s, 3, "stranger", None)
        assert reg["state"] == "pending"
        with pytest.raises(ApiError) as e:
            await s.map(machine(3), {"version": None})
        assert e.value.status == 403 and "approve" in e.value.message
        node = await s.db(s.store.get_node_by_machine_key, machine(3))
        await s.changed(s.store.approve_node, node.id)  # type: ignore[union-attr]
        assert "full" in await s.map(machine(3), {"version": None})

    run(tmp_path, scenario)


def test_service_rotation_and_removal_reach_peers(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        key = await auth_key(s)
        await join(s, 1, "pi", key)
        await join(s, 2, "laptop", key)
        first = await s.map(machine(1), {"version": None})
        netmap = parse_netmap(first["full"])
        # The laptop rotates its node key: same machine, new node key.
        await s.register(machine(2), {"node_key": str(nodekey(9)), "hostname": "laptop"})
        answer = await s.map(machine(1), {"version": first["version"]})
        netmap = patched(netmap, answer["delta"])
        assert [p.public_key for p in netmap.peers] == [nodekey(9)]
        await s.logout(machine(2), {})
        answer2 = await s.map(machine(1), {"version": answer["version"]})
        assert patched(netmap, answer2["delta"]).peers == ()
        with pytest.raises(ApiError) as e:
            await s.map(machine(2), {"version": None})
        assert e.value.status == 403

    run(tmp_path, scenario)


def test_service_refuses_bad_auth_keys_and_bodies(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        single = await auth_key(s, reusable=False)
        await join(s, 1, "pi", single)
        with pytest.raises(ApiError) as e:
            await join(s, 2, "laptop", single)
        assert e.value.status == 403 and "auth key refused" in e.value.message
        with pytest.raises(ApiError):
            await join(s, 3, "x", "mpk-1-bogus")
        assert await s.db(s.store.get_node_by_machine_key, machine(2)) is None

    run(tmp_path, scenario)


def test_service_last_seen_is_written_in_batches_and_on_close(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        await join(s, 1, "pi", await auth_key(s))
        await s.map(machine(1), {"version": None})
        node = await s.db(s.store.get_node_by_machine_key, machine(1))
        assert node is not None and node.last_seen is None  # not yet: batched

    run(tmp_path, scenario)
    with open_store(tmp_path / "control.db") as store:
        node = store.get_node_by_machine_key(machine(1))
        assert node is not None and node.last_seen is not None  # flushed on close

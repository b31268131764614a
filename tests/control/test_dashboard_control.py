"""Control's part of the dashboard (issue 16): routes approved by a pre-auth key's tag
(control/autoapprove.py: the key a mesh created on the Pi logs in with, so the
owner never approves their own Pi), and renaming a hosted device."""

from __future__ import annotations

from datetime import timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest

from appliance.control.autoapprove import AUTO_APPROVE, auto_approved
from appliance.control.service import ControlService
from appliance.control.store_records import utcnow
from appliance.wire.netmap import parse_netmap
from tests.control.test_service import join, machine, run

EXIT = [ip_network("0.0.0.0/0"), ip_network("::/0")]
LAN = ip_network("192.168.1.0/24")


def test_autoapprove_needs_the_tag_and_changes_only_when_something_is_new() -> None:
    assert auto_approved((), [], [LAN]) is None
    assert auto_approved(("other",), [], [LAN]) is None
    assert auto_approved((AUTO_APPROVE,), [], [LAN, *EXIT]) == (EXIT[0], LAN, EXIT[1])
    assert auto_approved((AUTO_APPROVE,), [LAN, *EXIT], [LAN]) is None  # nothing new: no version bump
    assert auto_approved((AUTO_APPROVE,), [LAN], [*EXIT]) == (EXIT[0], LAN, EXIT[1])  # kept, added


def _routes(full: dict[str, object], name: str) -> list[str]:
    netmap = parse_netmap(full["full"])
    return [str(r) for p in netmap.peers if p.name == name for r in p.routes]


def test_autoapprove_a_tagged_keys_node_serves_its_routes_at_once_others_wait(tmp_path: Path) -> None:
    async def scenario(s: ControlService) -> None:
        expires = utcnow() + timedelta(hours=1)
        _, tagged = await s.db(s.store.create_preauth_key, False, expires, [AUTO_APPROVE])
        _, plain = await s.db(s.store.create_preauth_key, True, expires)
        await join(s, 1, "pi", tagged)
        await join(s, 2, "laptop", plain)
        await join(s, 3, "router", plain)
        offer = {"endpoints": [], "advertise_routes": [str(LAN)], "advertise_exit_node": True}
        await s.update(machine(1), offer)
        await s.update(machine(3), offer | {"advertise_routes": ["192.168.9.0/24"]})
        full = await s.map(machine(2), {"version": None})
        assert _routes(full, "pi") == ["0.0.0.0/0", "192.168.1.0/24", "::/0"]
        assert _routes(full, "router") == []  # an untagged node's routes wait for an admin
        # The same offer again: nothing new, no new version.
        before = full["version"]
        await s.update(machine(1), offer)
        assert (await s.map(machine(2), {"version": None}))["version"] == before
        # The owner shares one more LAN later: approved as it is advertised.
        await s.update(machine(1), offer | {"advertise_routes": [str(LAN), "10.1.0.0/16"]})
        full = await s.map(machine(2), {"version": None})
        assert "10.1.0.0/16" in _routes(full, "pi")

    run(tmp_path, scenario)


def test_service_device_rename_frees_the_old_name_and_refuses_a_taken_one(tmp_path: Path) -> None:
    from appliance.base.errors import MeshpiError
    from appliance.base.keys import PrivateKey
    from appliance.control.service_requests import ApiError

    phone, tablet = (str(PrivateKey(bytes([k]) * 32).public_key()) for k in (77, 78))

    async def scenario(s: ControlService) -> None:
        _, key = await s.db(s.store.create_preauth_key, False, utcnow() + timedelta(hours=1))
        await join(s, 1, "pi", key)
        await s.device(machine(1), {"action": "add", "name": "phone", "public_key": phone})
        await s.device(machine(1), {"action": "add", "name": "tablet", "public_key": tablet})
        for body, status in [
            ({"action": "rename", "public_key": phone, "name": "tablet"}, 409),
            ({"action": "rename", "public_key": phone}, 400),
            ({"action": "rename", "public_key": phone, "name": "\x00"}, 400),
            (
                {
                    "action": "rename",
                    "public_key": str(PrivateKey(bytes([79]) * 32).public_key()),
                    "name": "x",
                },
                404,
            ),
        ]:
            with pytest.raises((ApiError, MeshpiError)) as refused:  # bad fields: ConfigError, a MeshpiError
                await s.device(machine(1), body)
            assert refused.value.status == status, (body, refused.value)
        await s.device(machine(1), {"action": "rename", "public_key": phone, "name": "Anna's phone"})
        other = str(PrivateKey(bytes([80]) * 32).public_key())
        answer = await s.device(machine(1), {"action": "add", "name": "phone", "public_key": other})
        assert answer["dns_name"] == "phone"  # the old name is free, and so is its DNS label
        (pi,) = await s.db(s.store.list_nodes)
        labels = {d.name: d.dns_name for d in pi.devices}
        assert labels["Anna's phone"] == "anna-s-phone", labels  # the DNS label follows the rename

    run(tmp_path, scenario)

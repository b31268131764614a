"""Host DNS on the image (issue 13): systemd-resolved runs there and owns
/etc/resolv.conf (a symlink to its stub), so the agent uses resolved's per-link
settings: meshpi0 gets the node's mesh address as its DNS server and the mesh
domain, while up; `meshpi down` leaves resolved (and resolv.conf) as they were.
The resolv.conf backend is proven in tests/netns/test_hostdns.py."""

from __future__ import annotations

import json
import time

import pytest

from tests.image.machine import Vm

# `meshpi down` takes the VM's data plane away until the agent is started again.
pytestmark = pytest.mark.disturbs_vm


def _link_dns(vm: Vm) -> tuple[str, str, str]:
    """resolvectl's dns, domain and default-route lines for meshpi0 ('' when it has none)."""
    out = []
    for verb in ("dns", "domain", "default-route"):
        res = vm.ssh(f"resolvectl {verb} meshpi0", check=False)
        out.append(res.stdout.strip().split(":", 1)[-1].strip() if res.returncode == 0 else "")
    return out[0], out[1], out[2]


def _wait(vm: Vm, check: object, what: str, timeout: float = 60) -> tuple[str, str, str]:
    deadline = time.monotonic() + timeout
    while True:
        now = _link_dns(vm)
        if check(now):  # type: ignore[operator]
            return now
        if time.monotonic() > deadline:
            journal = vm.ssh("journalctl -u meshpi-agent --no-pager -n 40", check=False).stdout
            raise AssertionError(f"timed out waiting for {what}; resolvectl: {now}\n{journal}")
        time.sleep(1)


def test_image_hostdns_resolved_per_link_while_up_gone_after_down(vm: Vm) -> None:
    assert vm.out("systemctl is-active systemd-resolved") == "active"
    stub = vm.out("readlink /etc/resolv.conf")
    assert stub.endswith("run/systemd/resolve/stub-resolv.conf"), stub
    addresses = json.loads(vm.out("ip -j addr show meshpi0"))[0]["addr_info"]
    mesh_v4 = next(a["local"] for a in addresses if a["family"] == "inet")

    dns, domain, default_route = _wait(vm, lambda s: s[0] != "", "meshpi0's DNS server in resolved")
    assert mesh_v4 in dns.split(), dns
    assert "mesh.internal" in domain.split(), domain  # the mesh domain control sends (capver 3)
    assert default_route == "no", default_route  # no exit node used here: only the mesh's names
    saved = json.loads(vm.out("cat /var/lib/meshpi/hostdns.json"))
    assert saved["backend"] == "resolved" and saved["interface"] == "meshpi0", saved

    try:
        vm.out("meshpi down")
        assert _link_dns(vm) == ("", "", ""), "resolved still has settings for a link meshpi removed"
        assert vm.ssh("test -e /var/lib/meshpi/hostdns.json", check=False).returncode != 0
        assert vm.out("readlink /etc/resolv.conf") == stub  # resolv.conf never touched
    finally:
        # Back as the other tests found it: the agent takes the mesh up again, and
        # with it meshpi0's DNS settings.
        vm.ssh("systemctl restart meshpi-agent", check=False)
    _wait(vm, lambda s: mesh_v4 in s[0].split(), "meshpi0's DNS server again after a restart", 120)

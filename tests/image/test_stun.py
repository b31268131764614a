"""STUN beside kernel WireGuard (issue 10), in the image's VM: the agent sends STUN from
port 51820 while the kernel's WireGuard owns it, and reads the answers through its raw
socket.

For the test the VM's router (vmnet) masquerades toward "the internet" (203.0.113.0/24),
as a home router does, and coturn (a STUN server nobody here wrote) answers on
203.0.113.11. The reflexive endpoint is then the router's address with port 51820: the
request left the VM from the WireGuard port itself (masquerade keeps a free port).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.image.machine import Vm
from tests.lab.host import wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="boots the image under qemu: set MESHPI_IMAGE_TESTS=1",
)

COTURN_V4 = "203.0.113.11"
ROUTER_WAN_V4 = "203.0.113.1"  # vmnet's address on the server's side
COTURN_CONF = """\
listening-ip={v4}
listening-port=3478
stun-only
no-tls
no-dtls
no-cli
no-stdout-log
log-file={log}
simple-log
pidfile={pid}
"""
# The VM's router NATs what leaves toward the internet; dropped after the test.
NAT = """table ip mpimg_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "server" masquerade
    }
}
"""
SET_STUN = """import json, sys
from appliance.client.localapi import LocalClient
print(json.dumps(LocalClient("/run/meshpi/local.sock", 30).patch("/v1/prefs", {"stun_servers": sys.argv[1:]})))
"""


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="needs coturn (./scripts/setup installs it)")
def test_image_stun_beside_kernel_wireguard_finds_the_public_endpoint(vm: Vm) -> None:
    net = vm.net
    scratch: Path = net.scratch
    net.server.run(["ip", "addr", "add", f"{COTURN_V4}/32", "dev", "lo"])
    conf = scratch / "turnserver.conf"
    conf.write_text(
        COTURN_CONF.format(v4=COTURN_V4, log=scratch / "turnserver.log", pid=scratch / "turn.pid")
    )
    coturn = net.server.popen(["turnserver", "-c", str(conf)], log=scratch / "turnserver.out")
    net.vmnet.run(["nft", "-f", "-"], input=NAT)
    try:

        def answers() -> bool:
            assert coturn.poll() is None, (scratch / "turnserver.out").read_text(errors="replace")
            try:  # from coturn's own namespace, as tests/netns/test_stun.py asks it
                res = net.server.run(["turnutils_stunclient", COTURN_V4], check=False, timeout=10)
            except subprocess.TimeoutExpired:
                return False
            return "reflexive addr" in res.stdout

        wait_for(answers, 60, "coturn", interval=1)
        assert vm.out("wg show meshpi0 listen-port") == "51820"
        assert "wireguard" in vm.out("ip -d link show meshpi0")  # the kernel's, not wireguard-go
        vm.out(f"/opt/meshpi/bin/python -c '{SET_STUN}' {COTURN_V4}:3478")
        want = f"{ROUTER_WAN_V4}:51820"

        def found() -> bool:
            check = json.loads(vm.out("meshpi netcheck --json"))
            return bool(check["ipv4"] == want)

        wait_for(found, 60, "the VM's reflexive endpoint through coturn", interval=2)
        check = json.loads(vm.out("meshpi netcheck --json"))
        # The VM's own control answers STUN from loopback too: no second view of the NAT
        # (reach/stun.py), so no "symmetric NAT" guess that would drop the candidate.
        assert check["udp"] is True and check["varies_by_destination"] is not True, check
        status = json.loads(vm.out("meshpi status --json"))
        assert status["reach"]["stun"]["ipv4"] == want, status["reach"]
        # Reported: a candidate endpoint the agent tells control about.
        wait_for(
            lambda: want in status_endpoints(vm), 30, "the endpoint in the agent's candidates", interval=2
        )
        journal = vm.out("journalctl -b -u meshpi-agent.service --no-pager -o cat")
        assert any("this node's endpoints:" in line and want in line for line in journal.splitlines()), (
            journal
        )
        # Nothing took the port from the kernel: its sockets on 51820 belong to no process.
        sockets = vm.out("ss -ulnpH 'sport = :51820'")
        assert sockets and "users:" not in sockets, sockets
    finally:
        vm.ssh(f"/opt/meshpi/bin/python -c '{SET_STUN}'", check=False)
        net.vmnet.run(["nft", "delete", "table", "ip", "mpimg_nat"], check=False)
        net.stop_process(coturn)
        net.server.run(["ip", "addr", "del", f"{COTURN_V4}/32", "dev", "lo"], check=False)


def status_endpoints(vm: Vm) -> list[str]:
    status = json.loads(vm.out("meshpi status --json"))
    return [str(e) for e in status["reach"].get("endpoints", [])]

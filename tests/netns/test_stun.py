"""STUN from the WireGuard port beside wireguard-go, in the lab (tests/lab/topology.py):

    laptop 10.77.0.2 ── lrouter (NAT 192.0.2.1) ───────┐
                                                      inet: meshpi-control STUN 203.0.113.10:3478
    pi 192.168.77.2 ─┬─ home (NAT 198.51.100.1) ──────┘      coturn 203.0.113.11:3478, [2001:db8:ff00::11]:3478
    lanhost .77.3  ──┘

The pi (exit node) and the laptop (using it) run meshpi with wireguard-go on 51820 and
a working tunnel; the prober runs in the pi's (or laptop's) namespace from this test
process, on that same port 51820.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest
from pyroute2 import Conntrack

from appliance.agent.reach.stun import Discovery, Port, StunDiscovery
from appliance.base.net import Endpoint
from appliance.kernel import stun as kstun
from appliance.wire import stun
from tests.lab import netns as ns
from tests.lab.host import REPO_ROOT, WIREGUARD_PORT, Host, parse_ping, wait_for
from tests.lab.mesh import Mesh
from tests.lab.topology import HOME_WAN_V4, LAPTOP_ROUTER_WAN_V4, PI_V6, SERVER_V4, Lab

BIN = REPO_ROOT / ".venv" / "bin"
COTURN_V4, COTURN_V6 = "203.0.113.11", "2001:db8:ff00::11"
SILENT_V4 = "203.0.113.12"  # an address of "the internet" where no STUN server answers
MESHPI_STUN = Endpoint(ip_address(SERVER_V4), 3478)
COTURN = Endpoint(ip_address(COTURN_V4), 3478)
COTURN6 = Endpoint(ip_address(COTURN_V6), 3478)
PI_MESH = "100.64.0.1"

COTURN_CONF = """\
listening-ip={v4}
listening-ip={v6}
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


@dataclass
class World:
    lab: Lab
    mesh: Mesh
    control_log: Path


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], what: str) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"{what} exited: {path.read_text(errors='replace')[-800:]}"
        return path.exists() and text in path.read_text(errors="replace")

    wait_for(ready, 15, what)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if not Path("/usr/bin/turnserver").exists():
        pytest.skip("needs coturn (./scripts/setup installs it)")
    with Lab() as lab:
        inet = lab.internet
        inet.run(["ip", "addr", "add", f"{COTURN_V4}/32", "dev", "lo"])
        inet.run(["ip", "addr", "add", f"{COTURN_V6}/128", "dev", "lo", "nodad"])
        inet.run(["ip", "addr", "add", f"{SILENT_V4}/32", "dev", "lo"])
        state, log = lab.scratch / "control", lab.scratch / "control.log"
        control = inet.popen([str(BIN / "meshpi-control"), "--state-dir", str(state), "serve",
                              "--listen", f"{SERVER_V4}:8443", "--stun-listen", f"{SERVER_V4}:3478"],
                             log=log)  # fmt: skip
        conf = lab.scratch / "turnserver.conf"
        turn_log = lab.scratch / "turnserver.log"
        conf.write_text(COTURN_CONF.format(v4=COTURN_V4, v6=COTURN_V6, log=turn_log,
                                           pid=lab.scratch / "turnserver.pid"))  # fmt: skip
        coturn = inet.popen(["turnserver", "-c", str(conf)], log=lab.scratch / "turnserver.out")
        _wait_log(log, "STUN on", control, "meshpi-control's STUN server")
        wait_for(lambda: coturn.poll() is None and _answers(inet, COTURN_V4), 15, "coturn")
        with Mesh.standard(lab, interface_prefix=f"mp{os.getpid() % 10000}s") as mesh:
            mesh.start()
            mesh.wait_until(lambda: lab.laptop.ping(PI_MESH, count=1)[1] == 1, 30, "the tunnel")
            yield World(lab, mesh, log)


def _answers(host: Host, server: str) -> bool:
    res = host.run(["turnutils_stunclient", server], check=False, timeout=10)
    return "reflexive addr" in res.stdout


def ep(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(ip_address(host.strip("[]")), int(port))


def fwmark(host: Host, interface: str) -> int:
    out = host.run(["wg", "show", interface, "fwmark"]).stdout.strip()
    return 0 if out in ("", "off") else int(out, 16)


class Pings:
    """A ping through the tunnel in the background; result() waits for its summary."""

    def __init__(self, host: Host, dst: str, count: int, interval: float) -> None:
        cmd = ["ip", "netns", "exec", host.ns, "ping", "-n", "-q", "-c", str(count), "-i", str(interval),
               "-W", "1", dst]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> tuple[int, int]:
        out, _ = self.proc.communicate(timeout=120)
        r = parse_ping(out)
        return r.sent, r.received


def test_stun_filter_passes_only_stun_to_the_port(inside: str) -> None:
    """The raw socket reads STUN to the WireGuard port, never anything else: not
    WireGuard's messages, not STUN to another port."""
    for family, lo in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        wg = socket.socket(family, socket.SOCK_DGRAM)
        wg.bind((lo, WIREGUARD_PORT))
        sender = socket.socket(family, socket.SOCK_DGRAM)
        request = stun.binding_request(stun.new_transaction_id())
        with wg, sender, kstun.stun_socket(family, WIREGUARD_PORT, 0, Endpoint(ip_address(lo), 0)) as raw:
            for data in (b"\x01\x00\x00\x00" + bytes(144), b"\x04\x00\x00\x00" + os.urandom(60), request[:4]):
                sender.sendto(data, (lo, WIREGUARD_PORT))
            sender.sendto(request, (lo, WIREGUARD_PORT + 1))
            sender.sendto(request, (lo, WIREGUARD_PORT))
            raw.settimeout(2)
            packet = raw.recv(2048)
            payload = packet[28:] if family == socket.AF_INET else packet[8:]
            assert payload == request
            raw.settimeout(0.2)
            with pytest.raises(TimeoutError):
                raw.recv(2048)
            assert len(wg.recv(2048, socket.MSG_DONTWAIT)) == 148  # WireGuard got its own


def test_stun_probe_without_capability_is_clear(inside: str) -> None:
    script = (
        "import sys; from ipaddress import ip_address; from appliance.base.net import Endpoint;"
        "from appliance.kernel import stun; from appliance.kernel.base import PermissionDenied\n"
        "try: stun.probe(Endpoint(ip_address('127.0.0.1'), 3478), 51820, 0, 0.5)\n"
        "except PermissionDenied as e: print('refused:', e); sys.exit(3)\n"
    )
    res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
                          sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "CAP_NET_RAW" in res.stdout


def test_stun_pi_finds_the_home_wan_while_the_tunnel_runs(world: World) -> None:
    """meshpi's server and coturn both see the pi's WireGuard port at the home WAN
    (v4) and at its routed address (v6); 200 pings through the tunnel while the
    prober runs lose nothing."""
    lab, pi = world.lab, world.mesh["pi"]
    mark = fwmark(lab.pi, pi.interface)
    want = Endpoint(ip_address(HOME_WAN_V4), WIREGUARD_PORT)
    pings = Pings(lab.laptop, PI_MESH, count=200, interval=0.02)
    probes = 0
    with ns.entered(lab.pi.ns):
        assert kstun.probe(MESHPI_STUN, WIREGUARD_PORT, mark, 3) == want
        assert kstun.probe(COTURN, WIREGUARD_PORT, mark, 3) == want
        assert kstun.probe(COTURN6, WIREGUARD_PORT, mark, 3) == Endpoint(ip_address(PI_V6), WIREGUARD_PORT)
        mapping = kstun.probe_mapping((MESHPI_STUN, COTURN), WIREGUARD_PORT, mark, 3)
        while pings.running():
            assert kstun.probe(MESHPI_STUN if probes % 2 else COTURN, WIREGUARD_PORT, mark, 3) == want
            probes += 1
    assert not mapping.varies_by_destination
    sent, received = pings.result()
    print(f"probes during the pings: {probes}; pings {received}/{sent}")
    assert probes >= 10
    assert (sent, received) == (200, 200)
    assert re.search(r"latest handshake", lab.pi.run(["wg", "show", pi.interface]).stdout)


def test_stun_meshpi_server_answers_coturns_client(world: World) -> None:
    """A client nobody here wrote (coturn's turnutils_stunclient, 20-byte requests)."""
    out = world.lab.lanhost.run(["turnutils_stunclient", SERVER_V4], timeout=10).stdout
    assert re.search(rf"UDP reflexive addr: {re.escape(HOME_WAN_V4)}:\d+", out), out


def _forget_stun_flows(router: Host) -> None:
    """Drop the router's conntrack entries of earlier probes, so the next ones are new flows."""
    with ns.entered(router.ns):
        ct = Conntrack()
        try:
            for entry in list(ct.dump_entries()):
                if entry.tuple_orig.dport == 3478:
                    ct.delete(entry)
        finally:
            ct.close()


def test_stun_symmetric_nat_varies_by_destination(world: World) -> None:
    """The laptop's router with plain masquerade keeps one mapping for all
    destinations; with `masquerade fully-random` (iptables: --random-fully) each destination gets its own."""
    lab, laptop = world.lab, world.mesh["laptop"]
    mark = fwmark(lab.laptop, laptop.interface)
    assert mark, "the laptop uses an exit node: WireGuard's packets carry a fwmark"
    rules = lab.lrouter.run(["nft", "-a", "list", "chain", "inet", "lab_lrouter", "postrouting"]).stdout
    handle = re.search(r"masquerade # handle (\d+)", rules)
    assert handle, rules
    with ns.entered(lab.laptop.ns):
        plain = kstun.probe_mapping((MESHPI_STUN, COTURN), WIREGUARD_PORT, mark, 3)
    assert plain.first == Endpoint(ip_address(LAPTOP_ROUTER_WAN_V4), WIREGUARD_PORT)
    assert not plain.varies_by_destination
    lab.lrouter.run(["nft", "replace", "rule", "inet", "lab_lrouter", "postrouting", "handle", handle[1],
                     "oifname", "wan", "ip", "saddr", "10.77.0.0/24", "masquerade", "fully-random"])  # fmt: skip
    try:
        _forget_stun_flows(lab.lrouter)
        with ns.entered(lab.laptop.ns):
            symmetric = kstun.probe_mapping((MESHPI_STUN, COTURN), WIREGUARD_PORT, mark, 3)
        print(f"fully-random: {symmetric.first} vs {symmetric.second}")
        assert symmetric.varies_by_destination
        assert symmetric.first.host == symmetric.second.host == ip_address(LAPTOP_ROUTER_WAN_V4)
    finally:
        lab.lrouter.run(["nft", "replace", "rule", "inet", "lab_lrouter", "postrouting", "handle", handle[1],
                         "oifname", "wan", "ip", "saddr", "10.77.0.0/24", "masquerade"])  # fmt: skip
        _forget_stun_flows(lab.lrouter)


def test_stun_fwmark_keeps_probes_out_of_the_exit_node(world: World) -> None:
    """The laptop sends everything through the pi; marked like WireGuard's own
    packets, the probe goes straight out and finds the laptop's own router."""
    lab, laptop = world.lab, world.mesh["laptop"]
    mark = fwmark(lab.laptop, laptop.interface)
    with ns.entered(lab.laptop.ns):
        marked = kstun.probe(MESHPI_STUN, WIREGUARD_PORT, mark, 3)
        unmarked = kstun.probe(MESHPI_STUN, WIREGUARD_PORT, 0, 3)
    assert marked == Endpoint(ip_address(LAPTOP_ROUTER_WAN_V4), WIREGUARD_PORT)
    assert unmarked.host == ip_address(HOME_WAN_V4)  # through the tunnel and out of the pi


def test_stun_flood_at_the_wireguard_port(world: World) -> None:
    """60,000 hostile datagrams at the pi's WireGuard port (forged answers from the
    STUN server's own address, cookie-shaped garbage, WireGuard-shaped garbage) while
    the pi's discovery thread runs every 50 ms, this test probes in a loop, and the
    laptop pings through the tunnel: no forged address is ever reported, the real one
    keeps being found, wireguard-go and the tunnel keep working."""
    lab, pi = world.lab, world.mesh["pi"]
    port = Port(WIREGUARD_PORT, fwmark(lab.pi, pi.interface))
    want = Endpoint(ip_address(HOME_WAN_V4), WIREGUARD_PORT)
    results: list[Discovery] = []
    with ns.entered(lab.pi.ns):  # the thread is born in the pi's namespace and stays there
        disc = StunDiscovery(lambda: [MESHPI_STUN, COTURN], lambda: port, interval=0.05, timeout=2)
        disc.subscribe(results.append)
        disc.start()
    try:
        assert disc.wait_round(0, 10) is not None
        pings = Pings(lab.laptop, PI_MESH, count=100, interval=0.05)
        flood = subprocess.Popen(["ip", "netns", "exec", lab.internet.ns, sys.executable, "-m",
                                  "tests.netns.stunflood", f"{SERVER_V4}:3478", f"{HOME_WAN_V4}:{WIREGUARD_PORT}",
                                  "60000"], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)  # fmt: skip
        probes = 0
        with ns.entered(lab.pi.ns):
            while flood.poll() is None:
                assert kstun.probe(MESHPI_STUN, WIREGUARD_PORT, port.fwmark, 3) == want
                probes += 1
        assert flood.wait(60) == 0
        during = pings.result()
        rounds = disc.round
        after = disc.wait_round(rounds, 10)
        assert after is not None
    finally:
        disc.close()
    print(f"flood: {flood.stdout.read().strip() if flood.stdout else ''}; pings during it "
          f"{during[1]}/{during[0]}; discovery rounds {rounds}, probes {probes}")  # fmt: skip
    assert all(d.v4 is None or d.v4.host != ip_address("6.6.6.6") for d in results)
    assert after.v4 == want and after.varies_by_destination is False
    assert not disc._thread.is_alive()
    assert pi.agent_running()
    sent, received = lab.laptop.ping(PI_MESH, count=10, interval=0.05)
    assert received == sent
    # The flood itself (a Python sender and wireguard-go parsing garbage on 2 shared cores)
    # may cost a few pings; after it, none may be lost.
    assert during[1] >= during[0] * 0.8, during


def test_stun_forged_answers_reach_the_prober_and_are_refused(world: World) -> None:
    """A server that stays silent while someone else floods forged answers from its
    address and port: they pass the filter (STUN, to the port), the prober refuses
    each one (not our transaction id) and ends with a timeout that says so."""
    lab, pi = world.lab, world.mesh["pi"]
    silent = Endpoint(ip_address(SILENT_V4), 3478)
    flood = lab.internet.popen([sys.executable, "-m", "tests.netns.stunflood", f"{silent}",
                                f"{HOME_WAN_V4}:{WIREGUARD_PORT}", "400000"])  # fmt: skip
    try:
        with ns.entered(lab.pi.ns), pytest.raises(kstun.StunTimeout) as caught:
            kstun.probe(silent, WIREGUARD_PORT, fwmark(lab.pi, pi.interface), 2.5)
    finally:
        lab.stop_process(flood)
    print(caught.value)
    assert re.search(r"ignored [1-9]\d* datagram", str(caught.value))
    assert pi.agent_running() and lab.laptop.ping(PI_MESH, count=3, interval=0.05)[1] == 3


def test_stun_control_survives_garbage_on_3478(world: World) -> None:
    """Garbage and a flood at meshpi-control's STUN port: it keeps answering."""
    flood = subprocess.run(["ip", "netns", "exec", world.lab.lanhost.ns, sys.executable, "-m",
                            "tests.netns.stunflood", "192.168.77.3:40000", f"{SERVER_V4}:3478", "10000"],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert flood.returncode == 0, flood.stderr
    assert _answers(world.lab.lanhost, SERVER_V4)
    assert "Traceback" not in world.control_log.read_text()


def test_stun_discovery_thread_keeps_running_after_an_unreachable_server(world: World) -> None:
    lab, pi = world.lab, world.mesh["pi"]
    port = Port(WIREGUARD_PORT, fwmark(lab.pi, pi.interface))
    dead = Endpoint(ip_address("203.0.113.99"), 3478)
    with ns.entered(lab.pi.ns):
        disc = StunDiscovery(lambda: [dead, MESHPI_STUN], lambda: port, interval=60, timeout=0.5)
        disc.start()
    try:
        got = disc.wait_round(0, 10)
    finally:
        disc.close()
    assert got is not None and got.v4 == Endpoint(ip_address(HOME_WAN_V4), WIREGUARD_PORT)
    assert got.failed == (dead,) and "no answer" in got.errors[0]

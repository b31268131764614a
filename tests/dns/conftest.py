"""Fixtures for the resolver's tests on real sockets: the server on loopback ports,
real upstreams (Debian's dnsmasq, logging every query it gets), real clients (dig).

    dig / test client ──udp,tcp──▶ DnsServer 127.0.0.1:P ──▶ dnsmasq "home"  127.0.0.1:Q  (*.test)
                                      (mesh.internal)      └▶ dnsmasq "lan"   127.0.0.1:R  (*.home.lan)

Loopback only, free high ports: no root needed for the server itself.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from appliance.agent.dns.server import DnsServer
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint

LOOPBACK = ip_address("127.0.0.1")
MESH = Zone(
    "mesh.internal",
    {
        "pi.mesh.internal": (ip_address("100.64.0.1"), ip_address("fd7a:115c:a1e0::1")),
        "laptop.mesh.internal": (ip_address("100.64.0.2"),),
        "phone.devices.mesh.internal": (ip_address("100.64.0.3"),),
        # 60 addresses: > 512 bytes (TC without EDNS0), < 1232 with EDNS0 1232.
        "many.mesh.internal": tuple(ip_address(f"100.65.0.{i}") for i in range(1, 61)),
    },
)


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port on 127.0.0.1")


@dataclass
class Dnsmasq:
    """A real upstream resolver; `queries()` is what it was asked (from its own log)."""

    endpoint: Endpoint
    log: Path
    process: subprocess.Popen[bytes]

    def queries(self, name: str | None = None) -> list[str]:
        lines = [line for line in self.log.read_text().splitlines() if "query[" in line]
        return [line for line in lines if name is None or f" {name} from" in line]


def start_dnsmasq(tmp: Path, records: dict[str, list[str]], local: str, ttl: int = 60) -> Dnsmasq:
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq (Debian dnsmasq-base; ./scripts/setup installs it)")
    port = free_port()
    log = tmp / f"dnsmasq-{port}.log"
    log.touch()
    args = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--listen-address={LOOPBACK}", "--bind-interfaces", f"--port={port}", "--pid-file=",
            "--log-queries", f"--log-facility={log}", f"--local-ttl={ttl}", f"--local=/{local}/"]  # fmt: skip
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0":
        args += ["--user=root", "--group=root"]
    for name, addresses in records.items():
        args += [f"--host-record={name},{address}" for address in addresses]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = Dnsmasq(Endpoint(LOOPBACK, port), log, process)
    deadline = time.monotonic() + 10
    # Ready when it logs its start-up (it opens its sockets before).
    while "started" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"dnsmasq did not start: {process.communicate()[1]!r}")
        time.sleep(0.02)
    return server


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Dnsmasq]:
    """The default upstream: answers for *.test, NXDOMAIN for other names under test."""
    records = {
        "www.example.test": ["192.0.2.10", "2001:db8::10"],
        "short.example.test": ["192.0.2.11"],
        # 100 addresses: too big for 1232 bytes over UDP, the forwarder must retry over TCP.
        "big.example.test": [f"198.51.100.{i}" for i in range(1, 101)],
    }
    server = start_dnsmasq(tmp_path, records, "test", ttl=60)
    yield server
    server.process.kill()
    server.process.wait()


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Dnsmasq]:
    """The home LAN's resolver, for split DNS: *.home.lan."""
    server = start_dnsmasq(tmp_path, {"nas.home.lan": ["192.168.1.20"]}, "home.lan")
    yield server
    server.process.kill()
    server.process.wait()


@pytest.fixture
def bind() -> Endpoint:
    return Endpoint(LOOPBACK, free_port())


@pytest.fixture
def server(bind: Endpoint, home: Dnsmasq) -> Iterator[DnsServer]:
    dns_server = DnsServer([bind], MESH, Upstreams(default=(home.endpoint,)), upstream_timeout=0.5)
    dns_server.start()
    yield dns_server
    dns_server.stop()


def dig(bind: Endpoint, *args: str) -> str:
    """Debian's dig against the server, one try."""
    if shutil.which("dig") is None:
        pytest.skip("needs dig (Debian bind9-dnsutils; ./scripts/setup installs it)")
    command = ["dig", f"@{bind.host}", "-p", str(bind.port), "+tries=1", "+time=3", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=False).stdout

"""Benchmark: the node's resolver (appliance/agent/dns) and dnsmasq, measured the same
way in the same run, on loopback.

    dnsperf (one client, cpu A) ──▶ meshpi DnsServer (own process, cpu B) ──▶ dnsmasq "upstream"
                                └─▶ dnsmasq "reference" (cpu B)           ──▶ (the same)

Both serve the same 200 mesh names (meshpi from its zone, dnsmasq from --host-record) and
forward *.example.test to the same upstream dnsmasq, with their caches warmed first.
For each of "mesh names" and "cached forwarded names": latency with one query in flight
(p50/p99 over every query, a Python client: its own cost is in both), then queries per
second with 64 in flight (dnsperf).
The two servers take turns, so the machine's load (2 shared cores here) hits both alike.
Also the resolver's CPU time while idle (it should sleep in epoll: no polling).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message

from tests.dns.conftest import free_port

NAMES = [f"node{i}.mesh.internal" for i in range(200)]
FORWARDED = [f"www{i}.example.test" for i in range(50)]


def spellings(count: int) -> list[str]:
    """Mesh names in random letter case (as 0x20-randomising resolvers ask): each one a new
    packet, so meshpi's packet cache misses and every query is parsed and answered afresh."""
    rng = random.Random(53)
    names = (NAMES[i % len(NAMES)] for i in range(count))
    return ["".join(c.upper() if rng.random() < 0.5 else c for c in name) for name in names]


COLD = spellings(40_000)

_SERVER = """
import os, sys
from ipaddress import ip_address
from appliance.agent.dns.server import DnsServer
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint
cpu, port, upstream = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
records = {f"node{i}.mesh.internal": (ip_address(f"100.64.{i // 250}.{i % 250 + 1}"),) for i in range(200)}
server = DnsServer([Endpoint(ip_address("127.0.0.1"), port)], Zone("mesh.internal", records),
                   Upstreams(default=(Endpoint(ip_address("127.0.0.1"), upstream),)))
server.start()
print("ready", flush=True)
sys.stdin.read()
print(dict(server.stats()), flush=True)
server.stop()
"""


def dnsmasq(port: int, args: list[str], cpu: int) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", str(cpu)] if cpu >= 0 else []
    command = [*pin, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-hosts", "--pid-file=",
               "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}", "--user=root",
               "--group=root", *args]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answering(port)
    return process


def wait_answering(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = ["dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=1", "+short", "node0.mesh.internal"]
        if subprocess.run(probe, capture_output=True, text=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


def dnsperf(port: int, queries: Path, cpu: int, *args: str) -> str:
    pin = ["taskset", "-c", str(cpu)] if cpu >= 0 else []
    command = [*pin, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-c", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def latency(port: int, names: list[str], seconds: float) -> tuple[float, float]:
    """p50 and p99 in ms, one query in flight, from this process (dnsperf with one query in
    flight paces itself far below what the servers do)."""
    wires = [dns.message.make_query(name, "A").to_wire() for name in names]
    samples = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))
        end = time.monotonic() + seconds
        for wire in itertools.cycle(wires):
            start = time.perf_counter()
            sock.send(wire)
            answer = sock.recv(65535)
            samples.append((time.perf_counter() - start) * 1000)
            if answer[:2] != wire[:2] or answer[3] & 0x0F:
                raise RuntimeError(f"bad answer from port {port}: {answer!r}")
            if time.monotonic() > end:
                break
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def cpu_seconds(pid: int) -> float:
    """User + system time of a process so far (/proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def qps(port: int, queries: Path, cpu: int, seconds: float) -> float:
    out = dnsperf(port, queries, cpu, "-q", "64", "-l", str(seconds))
    completed = next(line for line in out.splitlines() if "Queries completed" in line)
    if "(100.00%)" not in completed:
        print(f"  note: port {port}: {completed.strip()}", file=sys.stderr)
    return float(next(line.split()[-1] for line in out.splitlines() if "Queries per second" in line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="of each measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns each server takes; the best round counts"
    )
    parser.add_argument("--pin", action="store_true", help="client on one cpu, both servers on another")
    args = parser.parse_args()
    for tool in ("dnsmasq", "dnsperf", "dig", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench/dns: needs {tool} (./scripts/setup installs it)", file=sys.stderr)
            return 1
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 and args.pin else (-1, -1)
    if client_cpu >= 0:
        os.sched_setaffinity(0, {client_cpu})  # this process is the latency client

    work = Path(tempfile.mkdtemp(prefix="meshpi-bench-dns-"))
    mesh_queries, fwd_queries, cold_queries = work / "mesh.txt", work / "forwarded.txt", work / "cold.txt"
    cold_queries.write_text("".join(f"{name} A\n" for name in COLD))
    mesh_queries.write_text("".join(f"{name} A\n" for name in NAMES))
    fwd_queries.write_text("".join(f"{name} A\n" for name in FORWARDED))
    host_records = [f"--host-record={n},100.64.{i // 250}.{i % 250 + 1}" for i, n in enumerate(NAMES)]
    upstream_port, meshpi_port, reference_port = free_port(), free_port(), free_port()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream = [f"--host-record={n},192.0.2.{i + 1}" for i, n in enumerate(FORWARDED)]
        processes.append(
            dnsmasq(upstream_port, ["--no-resolv", "--local-ttl=3600", *upstream, *host_records], -1)
        )
        reference = ["--no-resolv", f"--server=127.0.0.1#{upstream_port}", "--cache-size=1000", *host_records]
        processes.append(dnsmasq(reference_port, reference, server_cpu))
        pids = {"dnsmasq": processes[-1].pid}
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(server_cpu), str(meshpi_port), str(upstream_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdin is not None
        pids["meshpi"] = server.pid
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the meshpi resolver did not start")
        for port in (meshpi_port, reference_port):  # warm both caches
            dnsperf(port, fwd_queries, client_cpu, "-n", "1", "-q", "1")

        # Idle CPU: the resolver should sleep in epoll while nobody asks.
        before = cpu_seconds(server.pid)
        time.sleep(2)
        idle_cpu_ms = (cpu_seconds(server.pid) - before) * 1000 / 2

        results: dict[str, dict[str, list[float]]] = {"meshpi": {}, "dnsmasq": {}}
        for _ in range(args.rounds):
            for who, port in (("meshpi", meshpi_port), ("dnsmasq", reference_port)):
                for kind, queries, names in (
                    ("mesh", mesh_queries, NAMES),
                    ("fwd", fwd_queries, FORWARDED),
                    ("cold", cold_queries, COLD),
                ):
                    p50, p99 = latency(port, names, args.seconds)
                    cpu_before = cpu_seconds(pids[who])
                    rate = qps(port, queries, client_cpu, args.seconds)
                    # Queries per second of the server's own CPU time: what one core would do.
                    per_core = rate * args.seconds / max(cpu_seconds(pids[who]) - cpu_before, 0.01)
                    row = results[who]
                    row.setdefault(f"{kind}_p50", []).append(p50)
                    row.setdefault(f"{kind}_p99", []).append(p99)
                    row.setdefault(f"{kind}_qps", []).append(rate)
                    row.setdefault(f"{kind}_qps_per_core", []).append(per_core)
                    print(
                        f"  {who:8} {kind:4} p50 {p50:.3f} ms  p99 {p99:.3f} ms  {rate:8.0f} q/s",
                        file=sys.stderr,
                    )
        server.stdin.close()
        print(f"meshpi resolver counters: {server.stdout.readline().strip()}", file=sys.stderr)
        server.wait(timeout=10)
    finally:
        for process in processes:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)

    def best(who: str, key: str) -> float:
        values = results[who][key]
        return max(values) if "qps" in key else min(values)

    for who in ("meshpi", "dnsmasq"):
        kinds = (("mesh", "mesh names"), ("fwd", "cached forwarded"), ("cold", "mesh, no packet cache"))
        for kind, label in kinds:
            p50, p99, rate, core = (
                best(who, f"{kind}_{what}") for what in ("p50", "p99", "qps", "qps_per_core")
            )
            print(f"{who:8} {label:21} p50 {p50:.3f} ms  p99 {p99:.3f} ms  {rate:6.0f} queries/s"
                  f"  ({core:.0f} per second of its cpu)")  # fmt: skip
    ratio = best("meshpi", "mesh_qps") / best("dnsmasq", "mesh_qps")
    fwd_ratio = best("meshpi", "fwd_qps") / best("dnsmasq", "fwd_qps")
    print(f"meshpi vs dnsmasq (queries/s): mesh names {ratio:.2f}, cached forwarded {fwd_ratio:.2f}; "
          f"meshpi idle CPU {idle_cpu_ms:.1f} ms/s")  # fmt: skip
    summary = {
        "mesh_p50_ms": round(best("meshpi", "mesh_p50"), 3),
        "mesh_p99_ms": round(best("meshpi", "mesh_p99"), 3),
        "qps": round(best("meshpi", "mesh_qps")),
        "fwd_p50_ms": round(best("meshpi", "fwd_p50"), 3),
        "fwd_p99_ms": round(best("meshpi", "fwd_p99"), 3),
        "fwd_qps": round(best("meshpi", "fwd_qps")),
        "qps_per_core": round(best("meshpi", "mesh_qps_per_core")),
        "dnsmasq_qps_per_core": round(best("dnsmasq", "mesh_qps_per_core")),
        "cold_p50_ms": round(best("meshpi", "cold_p50"), 3),
        "cold_p99_ms": round(best("meshpi", "cold_p99"), 3),
        "cold_qps": round(best("meshpi", "cold_qps")),
        "cold_qps_per_core": round(best("meshpi", "cold_qps_per_core")),
        "dnsmasq_mesh_p99_ms": round(best("dnsmasq", "mesh_p99"), 3),
        "dnsmasq_fwd_p99_ms": round(best("dnsmasq", "fwd_p99"), 3),
        "dnsmasq_qps": round(best("dnsmasq", "mesh_qps")),
        "dnsmasq_fwd_qps": round(best("dnsmasq", "fwd_qps")),
        "qps_vs_dnsmasq": round(ratio, 3),
        "fwd_qps_vs_dnsmasq": round(fwd_ratio, 3),
        "idle_cpu_ms_per_s": round(idle_cpu_ms, 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

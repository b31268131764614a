"""Benchmark: path selection behind NATs (tests/lab/nat_lab.py, two meshpi agents
in control mode, wireguard-go, control with its relay and STUN).

For each pair of NAT kinds, `--tries` fresh labs: the seconds from both nodes
joined (`meshpi up` returned) until a ping through the mesh is answered, the p50
of those, and the path the pair settles on. Then, in one restricted-restricted
lab: the failover (seconds from an nft rule cutting the direct path until both
sides are relayed) and the upgrade (from the cut healed until both are direct
again), `--tries` times each (p50); the idle failover (the direct path cut
after BUSY_FOR s without data, when it is checked every 25 s only: seconds from
the cut and the first ping until a ping is answered, through the relay),
`--idle-tries` times (p50); TCP throughput a -> b over the direct path and over
the relay: their ratio. The last line is one JSON object:
`pairs: [{a, b, path, first_packet_s}]`, `failover_s`, `upgrade_s`, ...

Everything runs on this machine (2 shared cores here): the figures compare paths
under the same load, they are not what a Pi on a real uplink gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from appliance.agent.reach.pathtypes import BUSY_FOR
from tests.lab.nat_mesh import NatMesh, nat_mesh

PAIRS = [
    ("cone", "cone"),
    ("restricted", "restricted"),
    ("cone", "symmetric"),
    ("restricted", "symmetric"),
    ("symmetric", "symmetric"),
    ("noudp", "restricted"),
]
PORT = 5201
_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = time.monotonic()
while (b := c.recv(262144)):
    n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""
_SENDER = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
end = time.monotonic() + float(sys.argv[3]); chunk = b"\\0" * 65536
while time.monotonic() < end:
    c.sendall(chunk)
c.close()
"""


def throughput(mesh: NatMesh, seconds: float) -> float:
    """Mbit/s from a to b through the tunnel."""
    target = mesh.b.mesh_v4()
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", mesh.b.host.ns, sys.executable, "-c", _RECEIVER, target, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        receiver.stdout.readline()  # listening
        sender = [sys.executable, "-c", _SENDER, target, str(PORT), str(seconds)]
        mesh.a.host.run(sender, timeout=seconds + 30)
        out, _ = receiver.communicate(timeout=30)
    finally:
        receiver.kill()
    n, elapsed = out.split()
    return int(n) * 8 / float(elapsed) / 1e6


def first_packets(kind_a: str, kind_b: str, tries: int) -> dict[str, object]:
    times, paths = [], []
    for i in range(tries):
        with nat_mesh(kind_a, kind_b) as mesh:
            first = mesh.first_packet(timeout=60)
            times.append(first)
            try:
                mesh.wait_path("direct", 15)  # proven within a couple of seconds, or never
                path = "direct"
            except Exception:  # noqa: BLE001 - not direct: relayed, or a pair that never settles
                now = (mesh.a.path() or "?", mesh.b.path() or "?")
                path = "relayed" if all(p == "relayed" for p in now) else "/".join(now)
            paths.append(path)
            print(f"{kind_a}-{kind_b} try {i + 1}: first packet {first:.2f}s, path {path}", file=sys.stderr)
    p50 = statistics.median(times)
    path = max(set(paths), key=paths.count)
    return {"a": kind_a, "b": kind_b, "path": path, "first_packet_s": round(p50, 2),
            "first_packet_all_s": [round(t, 2) for t in times], "paths": paths}  # fmt: skip


def answered_after(mesh: NatMesh, timeout: float = 60.0) -> float:
    """Seconds until a ping a -> b is answered (one every 50 ms until then)."""
    started = time.monotonic()
    cmd = ["ping", "-n", "-q", "-c", "1", "-i", "0.05", "-w", str(int(timeout)), mesh.b.mesh_v4()]
    res = mesh.a.host.run(cmd, check=False, timeout=timeout + 10)
    if res.returncode != 0:
        raise RuntimeError(f"no answer a -> b within {timeout:g}s: {res.stdout}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="of each throughput run")
    parser.add_argument("--idle-tries", type=int, default=3, help="of the idle failover (~15 s each)")
    args = parser.parse_args()
    pairs = [first_packets(a, b, args.tries) for a, b in PAIRS]
    for row in pairs:
        pair = f"{row['a']:>10} - {row['b']:<10}"
        print(f"{pair} {row['path']:<8} first packet p50 {row['first_packet_s']:.2f}s")
    failovers, upgrades = [], []
    with nat_mesh("restricted", "restricted") as mesh:
        mesh.first_packet(timeout=60)
        mesh.wait_path("direct", 60)
        for i in range(args.tries):
            cut = time.monotonic()
            mesh.lab.block_direct()
            mesh.wait_path("relayed", 30)
            failovers.append(time.monotonic() - cut)
            time.sleep(2)
            healed = time.monotonic()
            mesh.lab.unblock_direct()
            mesh.wait_path("direct", 30)
            upgrades.append(time.monotonic() - healed)
            took = f"failover {failovers[-1]:.2f}s, upgrade {upgrades[-1]:.2f}s"
            print(f"{took} (try {i + 1})", file=sys.stderr)
            time.sleep(2)
        idle_failovers = []
        for i in range(args.idle_tries):
            time.sleep(BUSY_FOR + 2)  # no data either way: both sides check every 25 s only
            mesh.lab.block_direct()
            idle_failovers.append(answered_after(mesh))
            mesh.wait_path("relayed", 30)
            print(f"idle failover {idle_failovers[-1]:.2f}s (try {i + 1})", file=sys.stderr)
            mesh.lab.unblock_direct()
            mesh.wait_path("direct", 30)
        direct = throughput(mesh, args.seconds)
        mesh.lab.block_direct()
        mesh.wait_path("relayed", 30)
        time.sleep(1)
        relayed = throughput(mesh, args.seconds)
    ratio = relayed / direct if direct else 0.0
    failover, upgrade = statistics.median(failovers), statistics.median(upgrades)
    idle = statistics.median(idle_failovers) if idle_failovers else None
    print(f"failover direct -> relay p50 {failover:.2f}s, upgrade relay -> direct p50 {upgrade:.2f}s")
    if idle is not None:
        print(f"idle failover (cut, then the first ping, until one is answered) p50 {idle:.2f}s")
    print(f"throughput: direct {direct:.1f} Mbit/s, relayed {relayed:.1f} Mbit/s, ratio {ratio:.2f}")
    print(json.dumps({"pairs": pairs, "failover_s": round(failover, 2), "upgrade_s": round(upgrade, 2),
                      "failover_all_s": [round(t, 2) for t in failovers],
                      "upgrade_all_s": [round(t, 2) for t in upgrades],
                      "idle_failover_s": None if idle is None else round(idle, 2),
                      "idle_failover_all_s": [round(t, 2) for t in idle_failovers],
                      "direct_mbit_s": round(direct, 1), "relayed_mbit_s": round(relayed, 1),
                      "relayed_vs_direct": round(ratio, 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

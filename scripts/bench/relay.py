"""Benchmark: TCP throughput between two wireguard-go nodes of the lab (laptop ->
pi), first direct (through the home router's port forward), then relayed through
meshpi-control's relay with the direct UDP path blocked (tests/netns/test_relay.py
sets up the same world). Prints Mbit/s of each, their ratio, and the control
process's CPU seconds per relayed Mbit. The last line is one JSON object.

Everything runs on this machine (2 shared cores here): the figures compare the two
paths under the same load, they are not what a Pi on a real uplink gets.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time

from nacl.public import PrivateKey as NaclPrivateKey

from appliance.base.keys import PrivateKey
from appliance.wire.seal import b64url
from tests.lab.host import wait_for
from tests.lab.topology import HOME_WAN_V4, Lab
from tests.netns.meshworld import start_control
from tests.netns.test_relay import _BLOCK_UDP, Side, World, _admin, _start_relay, _wireguard

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


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(world: World, seconds: float) -> float:
    """Mbit/s from the laptop to the pi through the tunnel."""
    pi, laptop = world.pi, world.laptop
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", pi.host.ns, sys.executable, "-c", _RECEIVER, pi.address, str(PORT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert receiver.stdout is not None
    assert receiver.stdout.readline().startswith("listening")
    sender = [sys.executable, "-c", _SENDER, pi.address, str(PORT), str(seconds)]
    laptop.host.run(sender, timeout=seconds + 30)
    out, _ = receiver.communicate(timeout=30)
    received, elapsed = out.split()
    return int(received) * 8 / float(elapsed) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with Lab() as lab:
        state = lab.scratch / "control"
        control = start_control(lab, state)
        raw = base64.b64decode((state / "control.key").read_text().strip())
        control_key = b64url(bytes(NaclPrivateKey(raw).public_key))
        auth = _admin(lab, state, "keys", "create", "--reusable", "--expires", "600").strip()
        tag = f"mpb{os.getpid() % 10000}"
        pi = Side("pi", lab.pi, f"{tag}p", 51820, "10.99.0.1", PrivateKey.generate())
        laptop = Side("laptop", lab.laptop, f"{tag}l", 51821, "10.99.0.2", PrivateKey.generate())
        world = World(lab, state, control_key, auth, pi, laptop)
        try:
            _wireguard(pi, laptop, None)
            _wireguard(laptop, pi, f"{HOME_WAN_V4}:51820")
            wait_for(lambda: laptop.host.ping_result(pi.address, count=1).received, 10, "direct path")
            direct = throughput(world, args.seconds)
            print(f"direct:  {direct:8.1f} Mbit/s")
            lab.internet.run(["nft", "-f", "-"], input=_BLOCK_UDP)
            _start_relay(world, pi, laptop)
            _start_relay(world, laptop, pi)
            wait_for(lambda: laptop.host.ping_result(pi.address, count=1).received, 15, "relayed path")
            cpu0, t0 = _cpu(control.pid), time.monotonic()
            relayed = throughput(world, args.seconds)
            cpu = _cpu(control.pid) - cpu0
            wall = time.monotonic() - t0
            print(f"relayed: {relayed:8.1f} Mbit/s  (ratio {relayed / direct:.2f})")
            per_mbit = cpu / (relayed * wall) if relayed else float("nan")
            # The default per-node byte limit is 32 Mbit/s (relay_limits.RelayLimits).
            print(f"relay CPU: {cpu:.2f} s over {wall:.1f} s = {per_mbit * 1000:.2f} ms CPU per Mbit")
        finally:
            for side in (pi, laptop):
                side.host.run(["ip", "link", "del", side.interface], check=False)
    summary = {"direct_mbit_s": round(direct, 1), "relayed_mbit_s": round(relayed, 1),
               "ratio": round(relayed / direct, 3), "relay_cpu_s_per_mbit": round(per_mbit, 5)}  # fmt: skip
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

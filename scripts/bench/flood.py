"""Benchmark: an anonymous flood at one `meshpi-control`, while approved nodes long-poll.

The server runs as its own process on loopback (its RSS is its own). A few nodes
join with a pre-auth key and long-poll `map` as agents do. Then, for --seconds
(default 60), bounded sets of coroutines flood the node API, all on loopback:

- anonymous registrations: a fresh machine key each time, hello + register with
  no auth key, from 64 source addresses (127.0.0.2-65), so both pending caps (per
  source, and in all) are reached;
- hellos: one machine key reused (the per-machine session bound), and fresh keys
  (the untrusted-session cap);
- oversized bodies: 2 MiB posts (413 at 1 MiB);
- a pending node's abuse: `update` with 40,000 routes, key rotations.

The reference, side by side: the same server and nodes over a quiet window of the
same kind (--quiet seconds, default 10) just before the flood. Figures: the server's
RSS growth, the deltas the approved nodes received, the addresses handed out
(the store's address counter), requests and answers by kind. Afterwards one real
change (an admin approves a route) must still reach every approved node.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.base.keys import PrivateKey  # noqa: E402
from appliance.wire.seal import ControlPublicKey, MachineKey, open_response, seal_request  # noqa: E402
from scripts.bench.controlsim import free_port, raise_nofile, rss_mb  # noqa: E402

Http = aiohttp.ClientSession
SOURCES = [f"127.0.0.{i}" for i in range(2, 66)]
OVERSIZED = 2 << 20
SETTLE = 2.0


class Node:
    """A client with a session, speaking the sealed protocol over aiohttp."""

    def __init__(self, url: str, control: ControlPublicKey, http: aiohttp.ClientSession,
                 machine: MachineKey | None = None) -> None:  # fmt: skip
        self.url, self.control, self.http = url, control, http
        self.machine = machine or MachineKey.generate()
        self.session: str | None = None
        self.number = 0

    async def post(
        self, op: str, plaintext: dict[str, Any], number: int
    ) -> tuple[int, dict[str, Any] | None]:
        sealed, nonce = seal_request(self.machine, self.control, plaintext, number)
        async with self.http.post(f"{self.url}/v1/{op}", data=sealed) as resp:
            data = await resp.read()
            if resp.status != 200:
                return resp.status, None
            return 200, open_response(self.machine, self.control, data, nonce)

    async def hello(self) -> int:
        status, answer = await self.post("hello", {"op": "hello"}, 0)
        if answer is not None:
            self.session, self.number = str(answer["session"]), 0
        return status

    async def call(self, op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if self.session is None and await self.hello() != 200:
            return 0, None
        self.number += 1
        status, answer = await self.post(op, {"op": op, "session": self.session, "body": body}, self.number)
        if status == 401:
            self.session = None
        return status, answer


class Flood:
    def __init__(self) -> None:
        self.answers: collections.Counter[tuple[str, int]] = collections.Counter()
        self.stop = asyncio.Event()
        self.deltas = 0  # answers carrying a change, to the approved nodes
        self.counting = False
        self.heard: dict[int, float] = {}  # node -> when it heard the final change
        self.expect = ""
        self.rss_series: list[float] = []  # RSS growth every 10 s of the flood, MiB


async def long_poll(flood: Flood, i: int, node: Node, version: int) -> None:
    while not flood.stop.is_set():
        status, answer = await node.call("map", {"version": version})
        if answer is None:
            raise RuntimeError(f"approved node {i}: map answered {status}")
        version = int(answer["version"])
        if "keepalive" in answer:
            continue
        if flood.counting:
            flood.deltas += 1
        if flood.expect and flood.expect in json.dumps(answer):
            flood.heard.setdefault(i, time.monotonic())


async def registrations(flood: Flood, url: str, control: ControlPublicKey, sources: list[Http]) -> None:
    """Anonymous registrations, each from the next source address."""
    n = 0
    while not flood.stop.is_set():
        n += 1
        node = Node(url, control, sources[n % len(sources)])
        key = str(PrivateKey.generate().public_key())
        status, _ = await node.call("register", {"node_key": key, "hostname": "flood"})
        flood.answers["register", status] += 1


async def hellos(flood: Flood, url: str, control: ControlPublicKey, http: aiohttp.ClientSession) -> None:
    reused = MachineKey.generate()
    while not flood.stop.is_set():
        for machine in (reused, None):
            status = await Node(url, control, http, machine).hello()
            flood.answers["hello", status] += 1


async def oversized(flood: Flood, url: str, http: aiohttp.ClientSession) -> None:
    body = b"\x01" + os.urandom(64) * (OVERSIZED // 64)
    while not flood.stop.is_set():
        try:
            async with http.post(f"{url}/v1/register", data=body) as resp:
                await resp.read()
                flood.answers["oversized", resp.status] += 1
        except aiohttp.ClientError:
            flood.answers["oversized", 0] += 1  # the server may close the connection on a 413


async def pending_abuse(flood: Flood, node: Node) -> None:
    routes = [f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(40_000)]
    while not flood.stop.is_set():
        status, _ = await node.call("update", {"advertise_routes": routes})
        flood.answers["pending update", status] += 1
        key = str(PrivateKey.generate().public_key())
        status, _ = await node.call("register", {"node_key": key, "hostname": "pending"})
        flood.answers["pending rotation", status] += 1


def address_counter(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT next_address_index FROM meta WHERE id = 1").fetchone()[0])


async def window(
    flood: Flood, pid: int, seconds: float, tasks: list[asyncio.Task[None]], clients: list[Http]
) -> tuple[float, int]:
    """Run for `seconds`, then close the flood's connections and give the server
    SETTLE seconds to see them go; returns (RSS growth MiB, deltas heard)."""
    rss0, _ = rss_mb(pid)
    flood.deltas, flood.counting = 0, True
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 0:
        await asyncio.sleep(min(10.0, left))
        if tasks:  # RSS over the flood: growing without bound, or levelling off at the caps?
            flood.rss_series.append(round(rss_mb(pid)[0] - rss0, 1))
    flood.counting = False
    flood.stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    flood.stop.clear()
    for client in clients:
        await client.close()
    if clients:
        # Open keep-alive connections cost the server memory while they last (~5 KB
        # each); what must not grow is what stays once they are gone.
        await asyncio.sleep(SETTLE)
    return rss_mb(pid)[0] - rss0, flood.deltas


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="meshpi-bench-flood-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (state / "server.log").open("wb")
    proc = subprocess.Popen([str(ROOT / ".venv/bin/meshpi-control"), "--state-dir", str(state), "serve",
                             "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0"],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (state / "admin.url").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {(state / 'server.log').read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        return await measure(args, proc.pid, url, state)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


async def measure(args: argparse.Namespace, pid: int, url: str, state: Path) -> dict[str, Any]:
    import base64

    from nacl.public import PrivateKey as NaclPrivateKey

    control = ControlPublicKey(
        bytes(NaclPrivateKey(base64.b64decode((state / "control.key").read_bytes())).public_key)
    )
    admin_url = (state / "admin.url").read_text().strip()
    token = (state / "admin.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(admin_url + "/admin/v1/keys", json={"reusable": True}, headers=auth) as resp:
            secret = (await resp.json())["key"]
        flood = Flood()
        nodes = [Node(url, control, http) for _ in range(args.nodes)]
        versions = []
        for i, node in enumerate(nodes):
            key = str(PrivateKey.generate().public_key())
            status, reg = await node.call(
                "register", {"node_key": key, "hostname": f"node{i}", "auth_key": secret}
            )
            assert reg is not None and reg["state"] == "approved", status
            await node.call("update", {"advertise_routes": ["192.168.50.0/24"]})
            status, full = await node.call("map", {"version": None})
            assert full is not None, status
            versions.append(int(full["version"]))
        polls = [
            asyncio.create_task(long_poll(flood, i, *nv))
            for i, nv in enumerate(zip(nodes, versions, strict=True))
        ]
        await asyncio.sleep(1)  # let the long-polls settle in
        flood.counting = False

        print(f"server pid {pid} on {url}, admin {admin_url}; {args.nodes} approved nodes long-polling")
        print(f"quiet reference: {args.quiet:g} s with no flood ...", flush=True)
        quiet_rss, quiet_deltas = await window(flood, pid, args.quiet, [], [])
        index0, rss_before = address_counter(state / "control.db"), rss_mb(pid)[0]

        attacker = aiohttp.ClientSession(timeout=timeout)
        pending = Node(url, control, attacker)
        await pending.call("register", {"node_key": str(PrivateKey.generate().public_key()), "hostname": "p"})
        sessions = [aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(local_addr=(ip, 0)))
                    for ip in SOURCES]  # fmt: skip
        try:
            kinds = set(args.kinds.split(","))
            tasks = []
            if "register" in kinds:
                tasks += [asyncio.create_task(registrations(flood, url, control, sessions[i:] + sessions[:i]))
                          for i in range(args.concurrency)]  # fmt: skip
            if "hello" in kinds:
                tasks += [asyncio.create_task(hellos(flood, url, control, attacker)) for _ in range(4)]
            if "oversized" in kinds:
                tasks += [asyncio.create_task(oversized(flood, url, attacker)) for _ in range(2)]
            if "pending" in kinds:
                tasks.append(asyncio.create_task(pending_abuse(flood, pending)))
            print(f"flood: {args.seconds:g} s, {len(tasks)} flooding coroutines ...", flush=True)
            t0 = time.monotonic()
            flood_rss, flood_deltas = await window(flood, pid, args.seconds, tasks, [*sessions, attacker])
            elapsed = time.monotonic() - t0 - SETTLE
        finally:
            for s in [*sessions, attacker]:
                await s.close()
        addresses = address_counter(state / "control.db") - index0
        rss_after, peak = rss_mb(pid)

        # Still working: one real change reaches every approved node.
        flood.expect = "192.168.50.0/24"
        polls2 = polls
        t0 = time.monotonic()
        async with http.get(admin_url + "/admin/v1/nodes", headers=auth) as resp:
            first = next(n for n in await resp.json() if n["name"] == "node0")
        async with http.post(f"{admin_url}/admin/v1/nodes/{first['id']}/routes",
                             json={"approved_routes": [flood.expect]}, headers=auth) as resp:  # fmt: skip
            assert resp.status == 200
        while len(flood.heard) < args.nodes - 1 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.01)
        heard_s = max(flood.heard.values(), default=t0 + 10) - t0
        flood.stop.set()
        for task in polls2:
            task.cancel()
        async with http.get(admin_url + "/metrics") as resp:
            metrics = await resp.text()

    total = sum(flood.answers.values())
    print(f"\nrequests in the flood: {total} in {elapsed:.1f} s ({total / elapsed:.0f}/s)")
    by_kind: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (kind, status), count in sorted(flood.answers.items()):
        by_kind[kind][str(status)] = count
    for kind, statuses in by_kind.items():
        print(f"  {kind:<17} " + ", ".join(f"{s}: {c}" for s, c in statuses.items()))
    pending_rows = next(
        (ln for ln in metrics.splitlines() if ln.startswith('meshpi_nodes{state="pending"}')), ""
    )
    print(
        f"  pending registrations stored: {pending_rows.rpartition(' ')[2]} (caps: 8 per source, 256 in all)"
    )
    print(f"server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after (peak {peak:.1f})")
    print(f"                    {'quiet (reference)':>18} {'flood':>10}")
    print(f"  RSS growth, MiB   {quiet_rss:>18.1f} {flood_rss:>10.1f}")
    print(f"  deltas to nodes   {quiet_deltas:>18} {flood_deltas:>10}")
    print(f"  addresses used    {0:>18} {addresses:>10}")
    print(f"  RSS growth every 10 s of the flood, MiB: {flood.rss_series}")
    print(
        f"after the flood, one approved route reached {len(flood.heard)}/{args.nodes} nodes "
        f"in {heard_s:.3f} s"
    )
    return {
        "seconds": round(elapsed, 1),
        "requests": total,
        "requests_per_s": round(total / elapsed),
        "answers": by_kind,
        "rss_growth_mb": round(flood_rss, 1),
        "rss_growth_quiet_mb": round(quiet_rss, 1),
        "rss_growth_series_mb": flood.rss_series,
        "deltas_to_approved_nodes": flood_deltas,
        "deltas_quiet": quiet_deltas,
        "addresses_consumed": addresses,
        "change_after_flood_s": round(heard_s, 3),
        "nodes_heard_change": len(flood.heard),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="flood duration (default 60)")
    ap.add_argument("--quiet", type=float, default=10.0, help="quiet reference window (default 10)")
    ap.add_argument("--nodes", type=int, default=5, help="approved nodes long-polling (default 5)")
    ap.add_argument("--kinds", default="register,hello,oversized,pending", help="what floods (default: all)")
    ap.add_argument("--concurrency", type=int, default=16, help="registration flooders (default 16)")
    args = ap.parse_args()
    print(f"meshpi-control flood benchmark: {os.cpu_count()} CPUs, loopback only")
    result = asyncio.run(run(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: N simulated nodes against one `meshpi-control` on this machine.

The server runs as its own process (so its RSS is its own). One asyncio process
simulates every node: each says hello, registers with a reusable pre-auth key,
syncs, then long-polls `map` with its version, as the agent does. No node touches
a kernel: they only read the deltas (a sample of them patches its netmap with
`wire/mapdelta.patched`, to prove the deltas apply).

The change measured: an admin approves one more route on node 0 via the admin API
(node 0 advertised the routes before the sync). t0 is taken just before the admin
call; each node stamps the moment the response carrying the route arrives. Figures:
p50/p99 of that latency over every online node (node 0 included: it hears it as
`self`), the sealed response size of that delta per node, the server's RSS.

Initial sync: a full map is O(N) per node, O(N^2) for the mesh, so only a sample
of nodes (--full-sync, default 300) fetches one, timed; the others start their
long-poll from the version the sample got, as agents do that reconnect with the
version they already hold. The total for all N is extrapolated from the sample.

After registering, the server restarts and every node reconnects at once for a
full map (`resync_full_all_s`), then again with the version each holds, as today's
agents poll (`resync_all_s`; control_resync.py), the map latency in that storm, a
single map's p99 on a quiet server, and the reference (today's per-node encoding,
timed in process on the same records) beside the shared one, with the ratio.

The simulator must not measure itself: long-polls go over lean keep-alive
connections (leanhttp.py) that stamp an answer when its last byte arrives, the
20 sample nodes patch their netmaps between changes, not during one, and the
simulator's own objects are frozen out of the garbage collector. `--timeline`
prints when the nodes heard each change; the server's CPU seconds per change
are printed beside the latency.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.base.keys import PrivateKey  # noqa: E402
from appliance.wire.seal import (  # noqa: E402
    ControlPublicKey,
    MachineKey,
)
from scripts.bench.control_resync import resync  # noqa: E402
from scripts.bench.controlsim import (  # noqa: E402
    APPLY_SAMPLE,
    Sim,
    SimNode,
    bounded,
    cpu_s,
    free_port,
    key,
    pct,
    raise_nofile,
    rss_mb,
    start_server,
    wait_up,
)

TIMELINE = [False]  # --timeline: print when the nodes heard each change
HEADSCALE = (
    "reference: headscale reports 300-600 clients overwhelm multi-core servers "
    "(juanfont/headscale issues #1014, #2491); not measured here"
)


async def run_size(n: int, changes: int, full_sync: int, timeout: float, concurrency: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="meshpi-bench-control-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(state, port)
    print(f"\n== {n} nodes: server pid {proc.pid} on {url}, state {state}", flush=True)
    try:
        token = await wait_up(url, proc, state)
        control = ControlPublicKey(_control_pub(state / "control.key"))
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
        timeout_cfg = aiohttp.ClientTimeout(total=120, connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout_cfg) as http:
            sim = Sim(url, token, http, (state / "admin.url").read_text().strip())

            async def restart(while_down: Callable[[], None]) -> int:
                """Stop the server, run `while_down`, start it again on the same state."""
                nonlocal proc
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
                while_down()
                (state / "admin.url").unlink(missing_ok=True)
                proc = start_server(state, port)
                await wait_up(url, proc, state)
                sim.admin_url = (state / "admin.url").read_text().strip()
                return proc.pid

            return await _measure(sim, n, control, proc.pid, changes, full_sync, timeout,
                                  concurrency, restart, state / "control.db")  # fmt: skip
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(state, ignore_errors=True)


def _control_pub(path: Path) -> bytes:
    import base64

    from nacl.public import PrivateKey as NaclPrivateKey

    return bytes(NaclPrivateKey(base64.b64decode(path.read_text().strip())).public_key)


async def _measure(
    sim: Sim,
    n: int,
    control: ControlPublicKey,
    pid: int,
    changes: int,
    full_sync: int,
    timeout: float,
    concurrency: int,
    restart: Callable[[Callable[[], None]], Awaitable[int]],
    db: Path,
) -> dict[str, Any]:
    rss_idle = rss_mb(pid)[0]
    t = time.monotonic()
    nodes = [
        SimNode(i, MachineKey(key(f"machine{i}")), str(PrivateKey(key(f"node{i}")).public_key()), control)
        for i in range(n)
    ]
    print(f"  keys for {n} nodes: {time.monotonic() - t:.1f} s", flush=True)
    secret = (await sim.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 7200}))["key"]

    async def register(node: SimNode) -> None:
        answer, _, _ = await sim.call(
            node, "register", {"node_key": node.node_pub, "hostname": f"sim{node.index}", "auth_key": secret}
        )
        if answer["state"] != "approved":
            raise RuntimeError(f"node {node.index} is {answer['state']}")

    reg_s = await bounded(nodes, concurrency, "hello+register", register)
    print(
        f"  registration: {n} hellos + {n} registers in {reg_s:.1f} s ({n / reg_s:.0f} nodes/s)", flush=True
    )

    # Node 0 offers the routes the admin will approve one by one.
    routes = [f"10.{200 + k // 250}.{k % 250}.0/24" for k in range(changes)]
    await sim.call(nodes[0], "update", {"endpoints": ["192.0.2.1:41641"], "advertise_routes": routes})
    listed = await sim.admin("GET", "/admin/v1/nodes")
    changer_id = next(x["id"] for x in listed if x["node_key"] == nodes[0].node_pub)
    sim.changer_pub = nodes[0].node_pub
    rss_registered = rss_mb(pid)[0]
    offers = {0: {"endpoints": ["192.0.2.1:41641"], "advertise_routes": routes}}
    resynced, pid = await resync(sim, nodes, restart, db, offers)  # everyone at once after a restart

    # Initial sync: a sample fetches full maps, all at once, as after a mass start.
    sample = nodes[: min(n, full_sync)]
    full_sizes: list[int] = []

    async def full(node: SimNode) -> None:
        answer, size, arrived = await sim.call(node, "map", {"version": None})
        node.version = answer["version"]
        full_sizes.append(size)
        sim.saw(node, answer, size, arrived)

    sync_s = await bounded(sample, len(sample), "full map", full)
    per_full = sync_s / len(sample)
    est_all = per_full * n
    print(
        f"  initial sync: {len(sample)} full maps of {n - 1} peers in {sync_s:.1f} s "
        f"({per_full * 1000:.0f} ms each, {statistics.median(full_sizes) / 1024:.0f} KiB sealed); "
        f"all {n}: ~{est_all:.0f} s extrapolated (O(N) per node)",
        flush=True,
    )
    start_version = max(x.version or 0 for x in sample)
    for node in nodes[len(sample) :]:
        node.version = start_version  # reconnecting with the version it holds

    # The simulator holds millions of objects (keys, sample netmaps); a full garbage
    # collection over them stalls every simulated node at once. Real nodes are
    # separate machines: keep the simulator's own pauses out of the figures.
    gc.collect()
    gc.freeze()

    # Everyone long-polls; ramp the connections in so the listen backlog keeps up.
    tasks: list[asyncio.Task[None]] = []
    for i, node in enumerate(nodes):
        tasks.append(asyncio.create_task(sim.poll(node)))
        if i % 250 == 249:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 60
    online = 0
    while time.monotonic() < deadline:
        metrics = await _metrics(sim)
        online = int(metrics.get("meshpi_nodes_online", 0))
        if online >= n:
            break
        await asyncio.sleep(0.5)
    print(f"  online (server's count of open long-polls): {online}/{n}", flush=True)
    await asyncio.sleep(1.0)

    latencies: list[float] = []
    sizes: list[int] = []
    missed_total = 0
    for k in range(changes):
        sim.received.clear()
        sim.expect = routes[k]
        cpu0 = cpu_s(pid)
        t0 = time.monotonic()
        await sim.admin("POST", f"/admin/v1/nodes/{changer_id}/routes", {"approved_routes": routes[: k + 1]})
        admin_s = time.monotonic() - t0
        end = t0 + timeout
        while len(sim.received) < n and time.monotonic() < end:
            await asyncio.sleep(0.01)
        server_cpu = cpu_s(pid) - cpu0  # sending the change and taking the re-polls
        got = [arrived - t0 for arrived, _ in sim.received.values()]
        missed = n - len(got)
        missed_total += missed
        latencies += got
        sizes += [size for _, size in sim.received.values()]
        print(
            f"  change {k + 1}/{changes}: {len(got)}/{n} nodes in {max(got):.3f} s "
            f"(p50 {pct(got, 0.5):.3f}, p99 {pct(got, 0.99):.3f}; admin call {admin_s * 1000:.0f} ms; "
            f"server CPU {server_cpu:.2f} s, {server_cpu / n * 1e6:.0f} us per node)"
            + (f", {missed} MISSED within {timeout:.0f} s" if missed else ""),
            flush=True,
        )
        if TIMELINE[0]:
            quantiles = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9)
            marks = " ".join(f"{pct(got, q):.2f}" for q in quantiles)
            print(f"    arrivals at p1, p10, p25, p50, p75, p90: {marks} s")
        sim.expect = None
        await asyncio.sleep(1.5)  # let the re-polls settle before the next change
        sim.apply_deferred()

    rss_now, rss_peak = rss_mb(pid)
    metrics = await _metrics(sim)
    sim.stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for node in nodes:
        if node.conn is not None:
            node.conn.close()
    checked = [x for x in nodes[:APPLY_SAMPLE] if x.netmap is not None]
    applied_ok = all(
        any(str(p.public_key) == sim.changer_pub and len(p.routes) == changes for p in x.netmap.peers)
        for x in checked
        if x.index != 0 and x.netmap is not None
    )
    update_bytes = statistics.median(sizes)
    result = {
        "nodes": n,
        "p50_s": round(pct(latencies, 0.5), 4),
        "p99_s": round(pct(latencies, 0.99), 4),
        "max_s": round(max(latencies), 4),
        "missed": missed_total,
        "changes": changes,
        "update_bytes": int(update_bytes),
        "update_bytes_min": min(sizes),
        "update_bytes_max": max(sizes),
        "server_rss_mb": round(rss_now, 1),
        "server_rss_peak_mb": round(rss_peak, 1),
        "server_rss_idle_mb": round(rss_idle, 1),
        "server_rss_registered_mb": round(rss_registered, 1),
        "registration_s": round(reg_s, 2),
        "initial_sync_s": round(sync_s, 2),
        "initial_sync_nodes": len(sample),
        "initial_sync_all_est_s": round(est_all, 1),
        "full_map_bytes": int(statistics.median(full_sizes)),
        **resynced,
    }
    print(f"  latency over {len(latencies)} deliveries: p50 {result['p50_s']} s, p99 {result['p99_s']} s, "
          f"max {result['max_s']} s, missed {missed_total}")  # fmt: skip
    print(f"  sealed delta per node: median {update_bytes:.0f} B (min {min(sizes)}, max {max(sizes)})")
    print(f"  server RSS: {rss_idle:.1f} MiB idle, {rss_registered:.1f} MiB registered, "
          f"{rss_now:.1f} MiB with {n} long-polls (peak {rss_peak:.1f} MiB); "
          f"{(rss_now - rss_idle) * 1024 / n:.1f} KiB per node")  # fmt: skip
    print(f"  server's own latency metric: sum {metrics.get('meshpi_map_update_latency_seconds_sum')} / "
          f"count {metrics.get('meshpi_map_update_latency_seconds_count')}")  # fmt: skip
    print(f"  patched: {sim.applied} deltas applied by {len(checked)} sample nodes, "
          f"route present in all: {applied_ok}; client errors: {len(sim.errors)}")  # fmt: skip
    for err in sim.errors[:5]:
        print(f"    {err}")
    if not applied_ok:
        raise RuntimeError("a sample node's netmap lacks the change after patched")
    return result


async def _metrics(sim: Sim) -> dict[str, float]:
    async with sim.http.get(sim.admin_url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1000,5000", help="comma-separated sizes (default 1000,5000)")
    ap.add_argument("--changes", type=int, default=3, help="changes measured per size (default 3)")
    ap.add_argument("--full-sync", type=int, default=300, help="nodes that fetch a full map (default 300)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds a change may take to reach all")
    ap.add_argument("--concurrency", type=int, default=64, help="registrations in flight (default 64)")
    ap.add_argument("--timeline", action="store_true", help="print arrival quantiles per change")
    args = ap.parse_args()
    TIMELINE[0] = args.timeline
    sizes = [int(x) for x in args.nodes.split(",") if x.strip()]
    raise_nofile()
    print(f"meshpi-control benchmark: sizes {sizes}, {os.cpu_count()} CPUs, "
          f"nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")  # fmt: skip
    print(HEADSCALE)
    runs = [
        asyncio.run(run_size(n, args.changes, args.full_sync, args.timeout, args.concurrency)) for n in sizes
    ]
    print()
    for r in runs:
        ok = "meets" if r["p99_s"] < 2.0 and r["missed"] == 0 else "MISSES"
        print(f"{r['nodes']:>6} nodes: p50 {r['p50_s']:.3f} s, p99 {r['p99_s']:.3f} s ({ok} p99 < 2 s), "
              f"{r['update_bytes']} B per update, server RSS {r['server_rss_mb']} MiB, "
              f"initial sync {r['initial_sync_s']} s for {r['initial_sync_nodes']} full maps")  # fmt: skip
        ok = "meets" if r["resync_all_s"] <= 30 and not r["resync_failed"] else "MISSES"
        one = "meets" if r["map_p99_s"] < 2 else "MISSES"
        print(
            f"        resync after restart (agents poll from their version): all {r['resync_nodes']} "
            f"in {r['resync_all_s']} s ({ok} <= 30 s); single map p99 {r['map_p99_s']} s ({one} < 2 s)"
        )
        print(f"        every node asking for a full map instead: {r['resync_full_nodes']} in "
              f"{r['resync_full_all_s']} s ({r['resync_full_failed']} failed)")  # fmt: skip
        print(f"        reference (per-node encoding): {r['reference_map_ms']} ms a map, "
              f"~{r['reference_resync_cpu_est_s']} s CPU for all; shared {r['shared_map_ms']} ms: "
              f"x{r['map_cpu_ratio']} per map, resync x{r['resync_vs_reference']} faster")  # fmt: skip
    summary: dict[str, Any] = {"runs": runs}
    if len(runs) >= 2:
        first, last = runs[0], runs[-1]
        ratio = last["update_bytes"] / first["update_bytes"]
        key_name = f"update_bytes_ratio_{last['nodes']}_vs_{first['nodes']}"
        summary[key_name] = round(ratio, 4)
        print(f"update bytes {last['nodes']} vs {first['nodes']} nodes: x{ratio:.3f} (node ratio "
              f"x{last['nodes'] / first['nodes']:.0f}); p99 x{last['p99_s'] / first['p99_s']:.2f}; "
              f"RSS x{last['server_rss_mb'] / first['server_rss_mb']:.2f}")  # fmt: skip
    print(HEADSCALE)
    print(json.dumps(summary))
    failed = any(r["missed"] or r["resync_failed"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

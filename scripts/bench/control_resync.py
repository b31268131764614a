"""Control after a restart (issue 14, part 8): every node reconnects at once. Two
storms, each after a restart: every node asking for a full map (a fleet whose agents
restarted too: `resync_full_all_s`), then every node polling from the version it held,
as today's agents do (`resync_all_s`, below: resync_kept). Used by control.py.

The server is stopped and started again on the same state (sessions and caches are
gone, as after a real restart). While it is down, the reference is timed in this
process on the same records: today's per-node path (mapper.full_map, canonical
JSON, sealed) against the shared one (control/mapcache.py), per map, CPU only.

Then every node says hello and asks for a full map (`version` null), ramped in by
250 every 50 ms so the listen backlog keeps up; one in OLD_EVERY speaks as an agent
from before compression (capver 3) and gets the uncompressed answer. `resync_all_s`
runs from the first hello to the last answer that arrived and opened (its Box's MAC:
control's answer to this node). Inflating and parsing 5,000 maps would make the
simulator, not the server, the bottleneck on 2 cores, so every answer is opened
(its MAC checked) but two nodes in VERIFY_EVERY (a new agent, an old one) are checked in full:
its request's `re`, all N-1 peers, itself as `self`; and a few parse with
parse_netmap after the clock stops.

A single map: SINGLE maps fetched one after another on a quiet server, timed
request to last byte; `map_p99_s` is their p99.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nacl import bindings
from nacl.public import Box, PrivateKey

from appliance.control import mapper
from appliance.control.mapcache import MapCache
from appliance.control.store import open_store
from appliance.control.store_records import utcnow
from appliance.wire import mapzip
from appliance.wire.dnsname import DEFAULT_DOMAIN, DnsConfig
from appliance.wire.fields import parse_endpoint
from appliance.wire.netmap import CAPVER, parse_netmap
from appliance.wire.seal import b64, decode_json_object, encode_json
from scripts.bench.leanhttp import LeanConnection

OLD_EVERY = 20  # one node in 20 is an agent from before compression (a fleet mostly upgraded)
VERIFY_EVERY = 40  # a multiple of OLD_EVERY: index 0 is a new agent, 1 an old one
SINGLE = 50
REFERENCE_SAMPLE = 10


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def reference_timing(db: Path) -> dict[str, Any]:
    """Per-map CPU of today's per-node encoding against the shared one, on the same records."""
    store = open_store(db)
    try:
        records, mesh, version = list(store.list_nodes()), store.mesh, store.mesh_version()
    finally:
        store.close()
    now, dns = utcnow(), DnsConfig(DEFAULT_DOMAIN)
    box = Box(PrivateKey.generate(), PrivateKey.generate().public_key)
    step = max(1, len(records) // REFERENCE_SAMPLE)
    viewers = [r for r in records if mapper.visible(r, now)][::step][:REFERENCE_SAMPLE]
    re = b64(bytes(24))
    t = time.perf_counter()
    for viewer in viewers:
        full = mapper.full_map(mesh, viewer, records, now, 3, dns)
        box.encrypt(encode_json({"re": re, "body": {"version": version, "full": full}}))
    reference_ms = (time.perf_counter() - t) / len(viewers) * 1000
    cache = MapCache()
    t = time.perf_counter()
    cache.full(mesh, viewers[0], version, records, now, CAPVER, dns).sealed(box, bytes(24))
    cache.full(mesh, viewers[0], version, records, now, 3, dns).sealed(box, bytes(24))
    build_ms = (time.perf_counter() - t) * 1000  # both encodings, once per version
    figures: dict[str, float] = {}
    for capver, label in ((CAPVER, "shared_map_ms"), (3, "shared_old_agent_map_ms")):
        t = time.perf_counter()
        for viewer in viewers:
            cache.full(mesh, viewer, version, records, now, capver, dns).sealed(box, bytes(24))
        figures[label] = (time.perf_counter() - t) / len(viewers) * 1000
    return {
        "reference_map_ms": round(reference_ms, 2),
        "shared_map_ms": round(figures["shared_map_ms"], 3),
        "shared_old_agent_map_ms": round(figures["shared_old_agent_map_ms"], 3),
        "shared_build_ms": round(build_ms, 1),
        "reference_resync_cpu_est_s": round(reference_ms * len(records) / 1000, 1),
        "map_cpu_ratio": round(reference_ms / figures["shared_map_ms"], 1),
    }


def forget_sessions(nodes: list[Any]) -> None:
    """The restarted server knows no session and no connection."""
    for node in nodes:
        node.session = None
        if node.conn is not None:
            node.conn.close()
            node.conn = None


async def rejoin(sim: Any, node: Any, offers: dict[int, dict[str, Any]]) -> None:
    """What the agent does when its link to control broke (link.py `_serve`), before its poll."""
    await lean_call(sim, node, "hello", None)
    reg = {"node_key": node.node_pub, "hostname": f"sim{node.index}", "auth_key": None}
    await lean_call(sim, node, "register", reg)
    await lean_call(sim, node, "update", offers.get(node.index, {"endpoints": [], "advertise_routes": []}))


async def ramped(nodes: list[Any], reconnect: Callable[[Any], Awaitable[None]]) -> None:
    """Every node at once, ramped in by 250 every 50 ms so the listen backlog keeps up."""
    tasks = []
    for i, node in enumerate(nodes):
        tasks.append(asyncio.create_task(reconnect(node)))
        if i % 250 == 249:
            await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)


async def resync(
    sim: Any,
    nodes: list[Any],
    restart: Callable[[Callable[[], None]], Awaitable[int]],
    db: Path,
    offers: dict[int, dict[str, Any]],
) -> tuple[dict[str, Any], int]:
    """Restart the server, time the reference while it is down, then the storm.
    Returns the figures and the new server's pid."""
    n = len(nodes)
    ref: dict[str, Any] = {}
    pid = await restart(lambda: ref.update(reference_timing(db)))
    print(f"  reference (in process, same {n} records): today's per-node map {ref['reference_map_ms']} ms, "
          f"shared {ref['shared_map_ms']} ms (old agents {ref['shared_old_agent_map_ms']} ms), "
          f"x{ref['map_cpu_ratio']}; shared encoding built in {ref['shared_build_ms']} ms per version",
          flush=True)  # fmt: skip
    forget_sessions(nodes)
    arrivals: dict[int, tuple[float, float, int, bool]] = {}  # node -> (latency, arrived, bytes, old)
    kept: list[tuple[int, bytes]] = []
    bad: list[str] = []

    async def reconnect(node: Any) -> None:
        """What the agent does when its link to control broke (link.py `_serve`)."""
        old = node.index % OLD_EVERY == 1
        try:
            await rejoin(sim, node, offers)
            node.number += 1
            body: dict[str, Any] = {"version": None} if old else {"version": None, "capver": CAPVER}
            data, nonce = node.seal({"op": "map", "session": node.session, "body": body}, node.number)
            asked = time.monotonic()
            payload, arrived = await sim.post("map", data, node)
            # The MAC: control's answer, for this node (the Box's own open, minus PyNaCl's copies).
            plaintext = bindings.crypto_box_open_afternm(payload[24:], payload[:24], node.box.shared_key())
            if node.index % VERIFY_EVERY in (0, 1):  # a new agent and an old one
                text = plaintext if old else mapzip.inflate(plaintext)
                if old == mapzip.compressed(plaintext):
                    raise AssertionError(f"compressed={mapzip.compressed(plaintext)} for old={old}")
                doc = decode_json_object(text)
                full = doc["body"]["full"]
                if (
                    doc["re"] != b64(nonce)
                    or len(full["peers"]) != n - 1
                    or full["self"]["name"] != f"sim{node.index}"
                ):
                    raise AssertionError(
                        f"wrong map: {len(full['peers'])} peers, self {full['self']['name']}"
                    )
                if node.index % (VERIFY_EVERY * 20) == 0:
                    kept.append((node.index, text))
            arrivals[node.index] = (arrived - asked, arrived, len(payload), old)
        except Exception as e:  # counted and shown: a bench reports, it does not stop at the first
            bad.append(f"node {node.index}: {type(e).__name__}: {e}")

    sim.rehellos = 0
    start, sim_cpu, server_cpu = time.monotonic(), time.process_time(), cpu_s(pid)
    await ramped(nodes, reconnect)
    done = list(arrivals.values())
    resync_all_s = max(a[1] for a in done) - start if done else float("inf")
    sim_cpu, server_cpu = time.process_time() - sim_cpu, cpu_s(pid) - server_cpu
    rss_peak = rss_peak_mb(pid)
    for index, text in kept:  # after the clock: the whole typed parse, as an agent does
        netmap = parse_netmap(json.loads(text)["body"]["full"])
        assert len(netmap.peers) == n - 1 and netmap.self_node.name == f"sim{index}"
    new = [a[2] for a in done if not a[3]]
    old = [a[2] for a in done if a[3]]
    latencies = [a[0] for a in done]
    print(f"  resync after restart: {len(done)}/{n} nodes in sync in {resync_all_s:.1f} s "
          f"(map latency in the storm p50 {pct(latencies, 0.5):.2f} s, p99 {pct(latencies, 0.99):.2f} s); "
          f"sealed map {statistics.median(new) / 1024:.0f} KiB compressed, "
          f"{statistics.median(old) / 1024:.0f} KiB for old agents; {len(bad)} failed; "
          f"{len(kept)} parsed in full; {sim.rehellos} hellos again after a 401", flush=True)  # fmt: skip
    print(f"  CPU in the storm: server {server_cpu:.1f} s ({server_cpu / n * 1000:.1f} ms a node: "
          f"hello, register, update, map), simulator {sim_cpu:.1f} s; "
          f"server RSS peak {rss_peak:.0f} MiB", flush=True)  # fmt: skip
    for line in bad[:5]:
        print(f"    {line}")
    single = await single_maps(sim, [x for x in nodes if x.index in arrivals])
    print(f"  single full map on a quiet server: p50 {pct(single, 0.5) * 1000:.0f} ms, "
          f"p99 {pct(single, 0.99) * 1000:.0f} ms over {len(single)}", flush=True)  # fmt: skip
    figures = {
        "resync_full_all_s": round(resync_all_s, 2),
        "resync_full_nodes": len(done),
        "resync_full_failed": len(bad) + n - len(done),
        "resync_map_p50_s": round(pct(latencies, 0.5), 3),
        "resync_map_p99_s": round(pct(latencies, 0.99), 3),
        "full_map_bytes_compressed": int(statistics.median(new)),
        "full_map_bytes_old_agent": int(statistics.median(old)),
        "resync_rehellos": sim.rehellos,
        "resync_server_cpu_s": round(server_cpu, 1),
        "resync_sim_cpu_s": round(sim_cpu, 1),
        "resync_server_rss_peak_mb": round(rss_peak),
        "map_p50_s": round(pct(single, 0.5), 4),
        "map_p99_s": round(pct(single, 0.99), 4),
        **ref,
        "resync_vs_reference": round(ref["reference_resync_cpu_est_s"] / resync_all_s, 1),
    }
    kept, pid = await resync_kept(sim, nodes, restart, db, offers)
    return figures | kept, pid


async def resync_kept(
    sim: Any,
    nodes: list[Any],
    restart: Callable[[Callable[[], None]], Awaitable[int]],
    db: Path,
    offers: dict[int, dict[str, Any]],
) -> tuple[dict[str, Any], int]:
    """What today's agents do after a control restart (agent/control/link.py keeps the
    map version across reconnects): hello, register, update, and a poll from the
    version each holds. One node changed while control was down, so every poll is
    answered at once with a delta. `resync_all_s`: first hello to the last delta
    opened."""
    n = len(nodes)
    changed: dict[str, int] = {}

    def change_while_down() -> None:
        store = open_store(db)
        try:
            changed["from"] = store.mesh_version()
            node = store.get_node_by_machine_key(nodes[0].machine.public_key())
            assert node is not None
            moved = ["192.0.2.2:41641"]
            store.set_endpoints(node.id, [parse_endpoint(e) for e in moved])
            offers[0] = offers.get(0, {}) | {"endpoints": moved}  # its update says the same: no new version
            changed["to"] = store.mesh_version()
        finally:
            store.close()

    pid = await restart(change_while_down)
    forget_sessions(nodes)
    arrivals: dict[int, tuple[float, float, int]] = {}
    bad: list[str] = []

    async def reconnect(node: Any) -> None:
        old = node.index % OLD_EVERY == 1
        try:
            await rejoin(sim, node, offers)
            node.number += 1
            body: dict[str, Any] = {"version": changed["from"]}
            if not old:
                body["capver"] = CAPVER
            data, nonce = node.seal({"op": "map", "session": node.session, "body": body}, node.number)
            asked = time.monotonic()
            payload, arrived = await sim.post("map", data, node)
            plaintext = bindings.crypto_box_open_afternm(payload[24:], payload[:24], node.box.shared_key())
            if node.index % VERIFY_EVERY in (0, 1):
                doc = decode_json_object(plaintext)
                answer = doc["body"]
                if doc["re"] != b64(nonce) or answer.get("version") != changed["to"] or "delta" not in answer:
                    raise AssertionError(f"not the delta to {changed['to']}: {sorted(answer)}")
            arrivals[node.index] = (arrived - asked, arrived, len(payload))
        except Exception as e:
            bad.append(f"node {node.index}: {type(e).__name__}: {e}")

    sim.rehellos = 0
    start, server_cpu = time.monotonic(), cpu_s(pid)
    await ramped(nodes, reconnect)
    done = list(arrivals.values())
    resync_all_s = max(a[1] for a in done) - start if done else float("inf")
    server_cpu = cpu_s(pid) - server_cpu
    latencies = [a[0] for a in done]
    print(f"  resync after restart, agents polling from their version ({changed['from']} -> "
          f"{changed['to']}): {len(done)}/{n} nodes in sync in {resync_all_s:.1f} s (delta latency p50 "
          f"{pct(latencies, 0.5):.2f} s, p99 {pct(latencies, 0.99):.2f} s, "
          f"{statistics.median(a[2] for a in done) if done else 0:.0f} B sealed); "
          f"server CPU {server_cpu:.1f} s; "
          f"{len(bad)} failed; {sim.rehellos} hellos again after a 401", flush=True)  # fmt: skip
    for line in bad[:5]:
        print(f"    {line}")
    return {
        "resync_all_s": round(resync_all_s, 2),
        "resync_nodes": len(done),
        "resync_failed": len(bad) + n - len(done),
        "resync_delta_p99_s": round(pct(latencies, 0.99), 3) if done else None,
        "resync_kept_server_cpu_s": round(server_cpu, 1),
        "resync_kept_rehellos": sim.rehellos,
    }, pid


async def lean_call(
    sim: Any, node: Any, op: str, body: dict[str, Any] | None, retry: bool = True
) -> dict[str, Any]:
    """A sealed op over the node's keep-alive connection, with its kept Box: what the
    agent sends, without the simulator paying an X25519 or an aiohttp client per call."""
    if node.conn is None:
        host, _, port = sim.url.removeprefix("http://").partition(":")
        node.conn = LeanConnection(host, int(port))
    if op == "hello":
        plaintext: dict[str, Any] = {"op": "hello"}
        node.number = 0
    else:
        node.number += 1
        plaintext = {"op": op, "session": node.session, "body": body}
    data, nonce = node.seal(plaintext, node.number)
    status, payload, _arrived = await node.conn.post(f"/v1/{op}", data, timeout=300)
    if status == 401 and op != "hello" and retry:
        # Its session went before it was used: the table keeps at most 4,096 sessions of
        # machines not yet seen as approved nodes, and 10,000 hellos came at once. The
        # agent's client says hello again, once per call; so does this.
        sim.rehellos += 1
        await lean_call(sim, node, "hello", None)
        return await lean_call(sim, node, op, body, retry=False)
    if status != 200:
        raise RuntimeError(f"{op}: {status} {payload[:200]!r}")
    answer: dict[str, Any] = node.open(payload, nonce)
    if op == "hello":
        node.session = answer["session"]
    return answer


async def single_maps(sim: Any, nodes: list[Any]) -> list[float]:
    out = []
    for node in nodes[:: max(1, len(nodes) // SINGLE)][:SINGLE]:
        node.number += 1
        body = {"version": None, "capver": CAPVER}
        data, nonce = node.seal({"op": "map", "session": node.session, "body": body}, node.number)
        t = time.monotonic()
        payload, arrived = await sim.post("map", data, node)
        node.box.decrypt(payload)
        out.append(arrived - t)
    return out

"""Soak: one real agent against a real control while 100 peers churn around it.

One namespace holds meshpi-control (127.0.0.1:8443) and a control-mode agent
(userspace backend, wireguard-go) joined with `meshpi up`. The benchmark process
plays 100 more nodes (scripts/bench/controlsim.py's simulator: sealed hello,
register, update, as agents do) and an admin. After a warm-up it measures the
agent twice, from /proc and from the kernel:

- churn (`--duration` seconds, default 600) at `--rate` changes a second
  (default 1): a peer joins, a peer is removed, a peer's route is advertised
  and approved, a peer rotates its key (registers a new node key from the same
  machine), or the agent's own prefs change through its LocalAPI;
- idle (`--idle` seconds) after the churn, once the last coalesced netmap
  snapshot is written (65 s): nothing changes.

Figures: growth of open fds, threads and RSS over the churn (from the end of
the warm-up), of ip rules, routes (table 51820) and nft rules, the agent's log
size, and the bytes the agent wrote to storage (`/proc/<pid>/io` write_bytes),
per hour, idle and under churn. The state directory is on disk (ext4 here), the
log on tmpfs so that it is not counted as the agent's writes (on the Pi it goes
to journald, another process); its size is reported on its own.

Reference, side by side: what writing the netmap on every change would cost
(the agent before snapshots: netmap.json rewritten per change), from the size
of the snapshot at the end times the changes per hour.

A progress line every 15 s; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from nacl.public import PrivateKey as NaclPrivateKey

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.base.keys import PrivateKey  # noqa: E402
from appliance.client.localapi import LocalClient  # noqa: E402
from appliance.wire.loginurl import login_url  # noqa: E402
from appliance.wire.seal import ControlPublicKey, MachineKey  # noqa: E402
from scripts.bench.controlsim import Sim, SimNode, cpu_s, key  # noqa: E402
from tests.lab import netns  # noqa: E402
from tests.netns.powerloss import in_namespace, wait_for  # noqa: E402

BIN = ROOT / ".venv" / "bin"
URL = "http://127.0.0.1:8443"
KINDS = ("join", "remove", "route", "rotate", "prefs")
SNAPSHOT_SETTLE = 65.0  # appliance/agent/inputs.py writes netmap.json at most every 60 s
INTERFACE = f"mps{os.getpid() % 100000}"


def proc_figures(pid: int) -> dict[str, float]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {
        "cpu_s": cpu_s(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "write_bytes": int(io["write_bytes"]),
    }


def kernel_figures(ns: str) -> dict[str, int]:
    def count(cmd: list[str]) -> int:
        return len([ln for ln in netns.run(ns, cmd, check=False).stdout.splitlines() if ln.strip()])

    rules = count(["ip", "-4", "rule"]) + count(["ip", "-6", "rule"])
    routes = count(["ip", "-4", "route", "show", "table", "51820"])
    routes += count(["ip", "-6", "route", "show", "table", "51820"])
    nft = netns.run(ns, ["nft", "list", "table", "inet", "meshpi"], check=False).stdout
    nft_rules = sum(1 for ln in nft.splitlines() if ln.strip() and not ln.strip().startswith(
        ("table", "chain", "type", "}", "set", "elements", "flags", "comment", "policy")))  # fmt: skip
    peers = count(["wg", "show", INTERFACE, "peers"])
    return {"rules": rules, "routes": routes, "nft_rules": nft_rules, "wg_peers": peers}


def wireguard_go_pid() -> int:
    """The wireguard-go serving the soaked agent's interface (its own process)."""
    found = subprocess.run(["pgrep", "-f", f"wireguard-go.* {INTERFACE}$"], capture_output=True, text=True)
    return int(found.stdout.split()[0])


class Soak:
    def __init__(
        self, scratch: Path, logdir: Path, ns: str, peers: int, seed: int, kinds: tuple[str, ...] = KINDS
    ) -> None:
        self.kinds = kinds
        self.scratch, self.logdir, self.ns, self.peers_wanted = scratch, logdir, ns, peers
        self.state = scratch / "node"
        self.control_state = scratch / "control"
        self.sock = self.state / "local.sock"
        self.log = logdir / "agent.log"
        self.rng = random.Random(seed)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.changes: dict[str, int] = {}
        self.errors: list[str] = []
        self.serial = 0
        self.memtrace: Path | None = None  # --tracemalloc: the agent's snapshots go here

    def spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env=None if env is None else {**os.environ, **env})  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> subprocess.Popen[bytes]:
        self.spawn([str(BIN / "meshpi-control"), "--state-dir", str(self.control_state), "serve",
                    "--listen", "127.0.0.1:8443"], self.logdir / "control.log")  # fmt: skip
        # admin.url: control's admin API listens apart, on a free loopback port it writes there.
        wait_for(lambda: (self.control_state / "admin.url").exists(), 20, "control")
        env = None
        if self.memtrace is not None:
            self.memtrace.mkdir()
            env = {"PYTHONPATH": str(ROOT / "scripts/bench/memtrace"), "MESHPI_MEMTRACE": str(self.memtrace)}
        agent = self.spawn([str(BIN / "meshpi"), "agent", "--state-dir", str(self.state),
                            "--local-api", str(self.sock)], self.log, env)  # fmt: skip
        wait_for(lambda: LocalClient(self.sock, 2).get("/v1/status"), 20, "the agent")
        return agent

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # -- the simulated mesh ----------------------------------------------------

    async def setup(self, sim: Sim, control: ControlPublicKey) -> tuple[list[SimNode], str]:
        secret = (await sim.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 86400}))["key"]
        login = login_url(URL, control)
        res = netns.run(self.ns, [str(BIN / "meshpi"), "up", "--login-server", login, "--auth-key", secret,
                                  "--hostname", "soaked", "--backend", "userspace", "--interface", INTERFACE,
                                  "--no-port-mapping", "--state-dir", str(self.state),
                                  "--local-api", str(self.sock)], check=False)  # fmt: skip
        if not res.stdout.startswith("connected"):
            raise RuntimeError(f"meshpi up: {res.stdout}{res.stderr}")
        nodes = []
        for _ in range(self.peers_wanted):
            nodes.append(await self.join(sim, control, secret))
        return nodes, secret

    async def join(self, sim: Sim, control: ControlPublicKey, secret: str) -> SimNode:
        self.serial += 1
        n = self.serial
        machine, node_key = MachineKey(key(f"soak-machine{n}")), PrivateKey(key(f"soak-node{n}"))
        node = SimNode(n, machine, str(node_key.public_key()), control)
        body = {"node_key": node.node_pub, "hostname": f"peer{n}", "auth_key": secret}
        answer, _, _ = await sim.call(node, "register", body)
        if answer["state"] != "approved":
            raise RuntimeError(f"peer {n} is {answer['state']}")
        return node

    async def change(self, sim: Sim, control: ControlPublicKey, secret: str, nodes: list[SimNode]) -> None:
        kinds = list(self.kinds)
        if len(nodes) < self.peers_wanted - 5 or (kinds == ["join"] and len(nodes) > self.peers_wanted):
            kinds = ["join"] if len(nodes) < self.peers_wanted - 5 else ["remove"]
        elif len(nodes) > self.peers_wanted + 5:
            kinds = ["remove"]
        kind = self.rng.choice(kinds)
        if kind == "join":
            nodes.append(await self.join(sim, control, secret))
        elif kind == "remove":
            node = nodes.pop(self.rng.randrange(len(nodes)))
            listed = await sim.admin("GET", "/admin/v1/nodes")
            node_id = next(x["id"] for x in listed if x["node_key"] == node.node_pub)
            await sim.admin("DELETE", f"/admin/v1/nodes/{node_id}")
        elif kind == "route":
            node = self.rng.choice(nodes)
            route = f"10.{self.rng.randrange(1, 250)}.{self.rng.randrange(250)}.0/24"
            await sim.call(node, "update", {"endpoints": [], "advertise_routes": [route]})
            listed = await sim.admin("GET", "/admin/v1/nodes")
            node_id = next(x["id"] for x in listed if x["node_key"] == node.node_pub)
            await sim.admin("POST", f"/admin/v1/nodes/{node_id}/routes", {"approved_routes": [route]})
        elif kind == "rotate":
            node = self.rng.choice(nodes)
            self.serial += 1
            node.node_pub = str(PrivateKey(key(f"soak-rotated{self.serial}")).public_key())
            await sim.call(node, "register", {"node_key": node.node_pub, "hostname": f"peer{node.index}",
                                              "auth_key": None})  # fmt: skip
        else:
            changes = {"keepalive": self.rng.choice([15, 20, 25]),
                       "advertise_routes": [f"192.168.{self.rng.randrange(250)}.0/24"]}  # fmt: skip
            await asyncio.to_thread(LocalClient(self.sock, 10).patch, "/v1/prefs", changes)
        self.changes[kind] = self.changes.get(kind, 0) + 1


def memtrace_growth(folder: Path, after: int, top: int = 12) -> list[str]:
    """What grew in the agent between its first snapshot after `after` and its last one,
    by the line that allocated it (the last frames of its traceback), biggest first."""
    import tracemalloc

    snaps = sorted(folder.glob("snap-*.trace"))
    if len(snaps) < after + 2:
        return [f"too few tracemalloc snapshots ({len(snaps)})"]
    first, last = tracemalloc.Snapshot.load(str(snaps[after])), tracemalloc.Snapshot.load(str(snaps[-1]))
    lines = []
    for stat in last.compare_to(first, "traceback")[:top]:
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[::-1][:4])
        lines.append(f"{stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks: {where}")
    return lines


async def measure(args: argparse.Namespace, soak: Soak, pid: int) -> dict[str, Any]:
    key_text = (soak.control_state / "control.key").read_text().strip()
    control = ControlPublicKey(bytes(NaclPrivateKey(base64.b64decode(key_text)).public_key))
    token = (soak.control_state / "admin.token").read_text().strip()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        sim = Sim(URL, token, http, (soak.control_state / "admin.url").read_text().strip())
        t0 = time.monotonic()
        nodes, secret = await soak.setup(sim, control)
        wait_for(lambda: kernel_figures(soak.ns)["wg_peers"] >= args.peers, 60, "the peers in the kernel")
        print(f"joined: the agent and {len(nodes)} peers in {time.monotonic() - t0:.1f}s; warming up "
              f"{args.warmup:g}s with churn", flush=True)  # fmt: skip
        # Warm-up churns too: routes, rules and the nft table exist before the baseline.
        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            await soak.change(sim, control, secret, nodes)
            await asyncio.sleep(1 / args.rate)
        soak.changes.clear()
        await asyncio.sleep(5)  # the last warm-up change applied

        start, kstart, logstart = proc_figures(pid), kernel_figures(soak.ns), soak.log.stat().st_size
        traced = len(list(soak.memtrace.glob("snap-*.trace"))) if soak.memtrace else 0
        t_start = time.monotonic()
        next_print = t_start + 15
        done = 0
        samples: list[dict[str, float]] = []
        by_kind: dict[str, int] = {}  # write_bytes until the next change, per kind of change
        while (now := time.monotonic()) < t_start + args.duration:
            before = proc_figures(pid)["write_bytes"]
            counts = dict(soak.changes)
            try:
                await soak.change(sim, control, secret, nodes)
            except Exception as e:  # noqa: BLE001 - counted and shown; the soak goes on
                soak.errors.append(f"{type(e).__name__}: {e}")
            done += 1
            await asyncio.sleep(max(0.0, t_start + done / args.rate - time.monotonic()))
            kind = next((k for k in soak.changes if soak.changes[k] != counts.get(k)), "failed")
            by_kind[kind] = by_kind.get(kind, 0) + proc_figures(pid)["write_bytes"] - before
            if now >= next_print:
                fig = proc_figures(pid)
                samples.append(fig)
                print(f"{now - t_start:5.0f}s: {done} changes, fds {fig['fds']}, threads {fig['threads']}, "
                      f"rss {fig['rss_mb']:.1f} MB, wrote {fig['write_bytes'] - start['write_bytes']} bytes, "
                      f"{len(nodes)} peers, {len(soak.errors)} errors", flush=True)  # fmt: skip
                next_print += 15
        elapsed = time.monotonic() - t_start
        # Let the last changes settle (a delta in flight), then compare like with like.
        await asyncio.sleep(3)
        end, kend, logend = proc_figures(pid), kernel_figures(soak.ns), soak.log.stat().st_size
        growth = memtrace_growth(soak.memtrace, traced) if soak.memtrace else []
        for line in growth:
            print(f"tracemalloc: {line}", flush=True)
        churn_rate = (end["write_bytes"] - start["write_bytes"]) * 3600 / elapsed
        # Idle after the churn: first the coalesced netmap snapshot (at most one a
        # minute) catches up, then nothing at all is supposed to be written.
        print(f"churn done; settling {SNAPSHOT_SETTLE:g}s for the last snapshot, then idle {args.idle:g}s",
              flush=True)  # fmt: skip
        await asyncio.sleep(SNAPSHOT_SETTLE)
        wg_pid = wireguard_go_pid()
        idle0, log0, wg0 = proc_figures(pid), soak.log.stat().st_size, proc_figures(wg_pid)["cpu_s"]
        await asyncio.sleep(args.idle)
        idle1, log1, wg1 = proc_figures(pid), soak.log.stat().st_size, proc_figures(wg_pid)["cpu_s"]
        idle_rate = (idle1["write_bytes"] - idle0["write_bytes"]) * 3600 / args.idle
        # The agent's CPU while its peers never answer (the simulated nodes run no
        # WireGuard): path selection keeps trying them. The reference, side by side:
        # wireguard-go, which holds the same peers and retries their handshakes.
        cpu = (idle1["cpu_s"] - idle0["cpu_s"]) * 100 / args.idle
        wg_cpu = (wg1 - wg0) * 100 / args.idle
        print(f"idle {args.idle:g}s: wrote {idle1['write_bytes'] - idle0['write_bytes']} bytes "
              f"({idle_rate:.0f}/h), log +{log1 - log0} bytes; CPU: the agent {cpu:.2f} % of a core, "
              f"wireguard-go {wg_cpu:.2f} % (ratio {cpu / max(wg_cpu, 0.01):.2f})", flush=True)  # fmt: skip

        snapshot = (soak.state / "netmap.json").stat().st_size
        listed = await sim.admin("GET", "/admin/v1/nodes")
        approved = sum(len(x["approved_routes"]) for x in listed if x["name"] != "soaked")
        return {
            "peers": args.peers,
            "duration_s": round(elapsed),
            "changes": done,
            "changes_by_kind": soak.changes,
            "errors": len(soak.errors),
            "first_errors": soak.errors[:5],
            "fd_growth": end["fds"] - start["fds"],
            "thread_growth": end["threads"] - start["threads"],
            "rss_start_mb": round(start["rss_mb"], 1),
            "rss_growth_mb": round(end["rss_mb"] - start["rss_mb"], 1),
            "rss_max_mb": round(max([end["rss_mb"], *(s["rss_mb"] for s in samples)]), 1),
            "rules_growth": kend["rules"] - kstart["rules"],
            "routes_growth": kend["routes"] - kstart["routes"],
            "nft_rules_growth": kend["nft_rules"] - kstart["nft_rules"],
            "routes_expected_end": approved,
            "write_bytes_by_kind": {k: round(v / max(soak.changes.get(k, 1), 1)) for k, v in by_kind.items()},
            "kernel_start": kstart,
            "kernel_end": kend,
            "log_bytes_idle_per_hour": round((log1 - log0) * 3600 / args.idle),
            "log_bytes_churn_per_hour": round((logend - logstart) * 3600 / elapsed),
            "idle_write_bytes_per_hour": round(idle_rate),
            "idle_cpu_percent": round(cpu, 2),
            "idle_wireguard_go_cpu_percent": round(wg_cpu, 2),
            "idle_cpu_vs_wireguard_go": round(cpu / max(wg_cpu, 0.01), 2),
            "churn_write_bytes_per_hour": round(churn_rate),
            "churn_write_bytes_per_hour_without_prefs": round(
                (end["write_bytes"] - start["write_bytes"] - by_kind.get("prefs", 0)) * 3600 / elapsed
            ),
            # A whole page (or more) per rewrite of netmap.json, as write_bytes counts it.
            "reference_netmap_per_change_bytes_per_hour": round(
                -(-snapshot // 4096) * 4096 * done * 3600 / elapsed
            ),
            "netmap_snapshot_bytes": snapshot,
            **({"tracemalloc_growth": growth} if growth else {}),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--duration", type=float, default=600, help="seconds of churn (default 600)")
    p.add_argument("--rate", type=float, default=1.0, help="changes per second (default 1)")
    p.add_argument("--idle", type=float, default=60, help="seconds measured idle (default 60)")
    p.add_argument("--warmup", type=float, default=30, help="seconds of churn before the baseline")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"the changes to make (default {','.join(KINDS)})"
    )
    p.add_argument("--tracemalloc", action="store_true",
                   help="trace the agent's allocations, show what grew over the churn")  # fmt: skip
    args = p.parse_args()
    # The state on disk (write_bytes counts block-backed writes), the logs on tmpfs.
    scratch = Path(tempfile.mkdtemp(prefix="meshpi-soak-", dir="/var/tmp"))
    logdir = Path(tempfile.mkdtemp(prefix="meshpi-soak-", dir="/dev/shm"))
    ns = f"mps{os.getpid()}"
    netns.create(ns)
    soak = Soak(scratch, logdir, ns, args.peers, args.seed, tuple(args.kinds.split(",")))
    if args.tracemalloc:
        soak.memtrace = scratch / "memtrace"
    result: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            in_namespace(ns)  # control's API is on the namespace's loopback
            agent = soak.start()
            result.append(asyncio.run(measure(args, soak, agent.pid)))
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    try:
        worker = threading.Thread(target=body, name="soak")
        worker.start()
        worker.join()
    finally:
        soak.close()
        netns.delete(ns)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(logdir, ignore_errors=True)
    if failure:
        raise failure[0]
    print(json.dumps(result[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

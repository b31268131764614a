"""Benchmark: apply a 1,000-peer netmap to a wireguard-go device, then one changed
peer at 100, 1,000 and 5,000 peers, against `wg setconf` / `wg syncconf` on the
same kind of device, same run.

What "our apply" covers is what the agent does. Full apply: parse the netmap as
control sends it, plan, diff against the kernel, apply (WireGuard config,
addresses, sysctl). One-peer change: the agent's in-memory path in control mode
(bus.py): parse the one-peer delta, patch the typed netmap, plan (one peer, the
rest remembered), diff, apply. The output counts whole-netmap parses and renders
during the changes: there must be none. Device creation (starting wireguard-go)
is outside the timing for both sides. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.agent.bus import NetmapDelta  # noqa: E402
from appliance.agent.inputs import Wanted  # noqa: E402
from appliance.agent.reconcile import Reconciler  # noqa: E402
from appliance.base.keys import PrivateKey  # noqa: E402
from appliance.core.model import HostFacts, Scope  # noqa: E402
from appliance.core.planner import PeerMemo, plan  # noqa: E402
from appliance.core.prefs import Prefs  # noqa: E402
from appliance.kernel.real import real_system  # noqa: E402
from appliance.wire.mapdelta import parse_delta  # noqa: E402
from appliance.wire.netmap import codec_counts, parse_netmap  # noqa: E402
from tests.lab import netns  # noqa: E402

OURS, THEIRS = "mpbench0", "mpbench1"
BLOCK = 10  # one-peer changes timed in a row before the reference's turn


def key(label: str) -> PrivateKey:
    return PrivateKey(hashlib.sha256(label.encode()).digest())


SELF = key("self")


def peers(n: int) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        a, b = divmod(i + 2, 256)
        out.append(
            {
                "name": f"peer{i}",
                "public_key": str(key(f"peer{i}").public_key()),
                "addresses": [f"100.64.{a}.{b}", f"fd7a:6d70:6900::{i + 2:x}"],
                "endpoint": f"198.51.{100 + a % 2}.{b}:{40000 + i}",
                "routes": [],
            }
        )
    return out


def netmap_doc(plist: list[dict[str, object]]) -> dict[str, object]:
    return {
        "mesh": {"ipv4": "100.64.0.0/10", "ipv6": "fd7a:6d70:6900::/48"},
        "self": {
            "name": "bench",
            "public_key": str(SELF.public_key()),
            "addresses": ["100.64.0.1", "fd7a:6d70:6900::1"],
        },
        "peers": plist,
    }


def wg_conf(plist: list[dict[str, object]], prefs: Prefs) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {SELF.secret_base64()}",
        f"ListenPort = {prefs.listen_port + 1}",
        f"FwMark = {prefs.fwmark}",
    ]
    for p in plist:
        allowed = ", ".join(f"{a}/{32 if ':' not in a else 128}" for a in p["addresses"])  # type: ignore[union-attr]
        lines += [
            "[Peer]",
            f"PublicKey = {p['public_key']}",
            f"AllowedIPs = {allowed}",
            f"Endpoint = {p['endpoint']}",
            f"PersistentKeepalive = {prefs.keepalive}",
        ]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # No persistent keepalive here: with it, both devices would start a handshake
        # to each of thousands of unreachable endpoints every 5 s (crypto on both
        # cores), a load that grows with N and lands in every timing.
        self.prefs = Prefs(interface=OURS, backend="userspace", keepalive=0)
        self.scope = Scope(OURS, self.prefs.table, self.prefs.fwmark)
        self.system = real_system("userspace", tmp)
        self.reconciler = Reconciler(self.system, self.scope)
        self.netmap_path = tmp / "netmap.json"
        self.conf_path = tmp / "wg.conf"

    def fresh_devices(self) -> None:
        """New, empty devices, and an agent that has planned nothing yet."""
        self.memo = PeerMemo()
        self.wanted: Wanted | None = None
        self.facts: HostFacts | None = None
        self.in_kernel = 0.0
        for dev in (OURS, THEIRS):
            self.system.links.delete_link(dev)
            self.system.wireguard.create(dev)
            self.system.links.set_mtu_up(dev, 1280)
        self.reconciler = Reconciler(self.system, self.scope)

    def write(self, plist: list[dict[str, object]]) -> None:
        self.netmap_path.write_text(json.dumps(netmap_doc(plist)))
        self.conf_path.write_text(wg_conf(plist, self.prefs))

    def ours(self, reread: bool) -> float:
        """A full map, as the control link gets it: bytes -> parse -> plan -> apply."""
        t0 = time.perf_counter()
        netmap = parse_netmap(json.loads(self.netmap_path.read_bytes()), "bench")
        self.wanted = Wanted(netmap, self.prefs)
        self._apply(reread)
        return time.perf_counter() - t0

    def ours_delta(self, peer: dict[str, object]) -> float:
        """One changed peer, as the agent's in-memory path takes a control delta."""
        assert self.wanted is not None and self.wanted.netmap is not None
        wire = json.dumps({"changed": [peer], "removed": []}).encode()
        t0 = time.perf_counter()
        delta = parse_delta(json.loads(wire), self.wanted.netmap.mesh, "bench delta")
        self.wanted = self.wanted.patched(NetmapDelta(delta))
        self._apply(False)
        return time.perf_counter() - t0

    def _apply(self, reread: bool) -> None:
        """As the agent: the host's networks are read for a full apply (a resync),
        not for a delta (the agent re-reads them on a netlink event or a resync)."""
        assert self.wanted is not None and self.wanted.netmap is not None
        if reread or self.facts is None:
            self.facts = self.system.facts(self.scope)
        facts = self.facts
        desired = plan(self.wanted.netmap, self.prefs, SELF, facts, memo=self.memo)
        t0 = time.perf_counter()
        self.reconciler.sync(desired, reread=reread)
        self.in_kernel = time.perf_counter() - t0  # mostly wireguard-go answering the UAPI set

    def wg(self, verb: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["wg", verb, THEIRS, str(self.conf_path)], check=True)
        return time.perf_counter() - t0


def run(n_full: int, reps: int, change_ns: list[int], change_reps: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="meshpi-bench-"))
    bench = Bench(tmp)
    try:
        return measure(bench, n_full, reps, change_ns, change_reps)
    finally:
        for dev in (OURS, THEIRS):
            bench.system.links.delete_link(dev)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(bench: Bench, n_full: int, reps: int, change_ns: list[int], change_reps: int) -> dict[str, float]:
    out: dict[str, float] = {}

    full_ours, full_wg = [], []
    plist = peers(n_full)
    bench.write(plist)
    for rep in range(reps):
        bench.fresh_devices()
        # Alternate who goes first, so neither side always gets a warm cache.
        if rep % 2:
            full_wg.append(bench.wg("setconf"))
            full_ours.append(bench.ours(reread=True))
        else:
            full_ours.append(bench.ours(reread=True))
            full_wg.append(bench.wg("setconf"))
    got = bench.system.wireguard.read(OURS)
    assert got is not None and len(got.peers) == n_full, "the apply did not configure every peer"
    out["full_apply_s"] = statistics.median(full_ours)
    out["wg_setconf_s"] = statistics.median(full_wg)
    out["full_apply_ratio"] = out["full_apply_s"] / out["wg_setconf_s"]
    print(
        f"full apply of {n_full} peers: meshpi {out['full_apply_s'] * 1000:.1f} ms, "
        f"wg setconf {out['wg_setconf_s'] * 1000:.1f} ms, ratio {out['full_apply_ratio']:.2f} "
        f"(median of {reps})",
        flush=True,
    )

    for n in change_ns:
        plist = peers(n)
        bench.write(plist)
        bench.fresh_devices()
        bench.ours(reread=True)
        bench.wg("setconf")
        ours, sync, kernel = [], [], []
        counts_before = dict(codec_counts)
        # In alternating blocks, not one each: a syncconf of thousands of peers keeps
        # its wireguard-go busy (and the caches cold) for a while after it returns,
        # which would land in whichever side is timed next.
        for block in range(0, change_reps, BLOCK):
            reps = range(block, min(block + BLOCK, change_reps))
            for rep in reps:
                plist[n // 2]["endpoint"] = f"203.0.113.{rep % 250 + 1}:{50000 + rep}"
                ours.append(bench.ours_delta(plist[n // 2]))
                kernel.append(bench.in_kernel)
            for rep in reps:
                plist[n // 2]["endpoint"] = f"203.0.113.{rep % 250 + 1}:{50000 + rep}"
                bench.conf_path.write_text(wg_conf(plist, bench.prefs))
                sync.append(bench.wg("syncconf"))
        whole = {k: codec_counts[k] - counts_before.get(k, 0) for k in ("full_parse", "full_render")}
        out[f"one_peer_change_agent_ms_at_{n}"] = (
            statistics.median(o - k for o, k in zip(ours, kernel, strict=True)) * 1000
        )
        out[f"whole_map_parses_during_changes_at_{n}"] = whole["full_parse"]
        out[f"whole_map_renders_during_changes_at_{n}"] = whole["full_render"]
        dev = bench.system.wireguard.read(OURS)
        assert dev is not None and any(
            str(p.endpoint) == plist[n // 2]["endpoint"] for p in dev.peers.values()
        )
        out[f"one_peer_change_ms_at_{n}"] = statistics.median(ours) * 1000
        out[f"wg_syncconf_ms_at_{n}"] = statistics.median(sync) * 1000
        ratio = out[f"one_peer_change_ms_at_{n}"] / out[f"wg_syncconf_ms_at_{n}"]
        out[f"one_peer_change_ratio_at_{n}"] = ratio
        print(
            f"one-peer change at {n} peers: meshpi {out[f'one_peer_change_ms_at_{n}']:.2f} ms, "
            f"wg syncconf {out[f'wg_syncconf_ms_at_{n}']:.2f} ms, ratio {ratio:.2f} "
            f"(median of {change_reps}; the agent's own share {out[f'one_peer_change_agent_ms_at_{n}']:.2f} "
            "ms, "
            f"the rest is the device applying it); whole-netmap parses {whole['full_parse']}, "
            f"renders {whole['full_render']} during the {change_reps} changes",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--change-reps", type=int, default=30)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/apply needs root (it makes a network namespace)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    name = f"mpbench{os.getpid()}"
    netns.create(name)
    try:
        with netns.entered(name):
            figures = run(args.peers, args.reps, [100, args.peers, 5 * args.peers], args.change_reps)
    finally:
        netns.delete(name)
    n, big = args.peers, 5 * args.peers
    growth = figures[f"one_peer_change_ms_at_{big}"] / figures[f"one_peer_change_ms_at_{n}"]
    figures[f"one_peer_change_growth_{n}_to_{big}"] = growth
    agent_growth = figures[f"one_peer_change_agent_ms_at_{big}"] / figures[f"one_peer_change_agent_ms_at_{n}"]
    figures[f"one_peer_change_agent_growth_{n}_to_{big}"] = agent_growth
    print(f"one-peer change at {big} vs {n} peers: x{growth:.2f}, the agent's own share x{agent_growth:.2f} "
          "(flat is 1.0)", flush=True)  # fmt: skip
    print(json.dumps({k: round(v, 6) for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the exit node's data plane, in the one place here with kernel
WireGuard: the image under qemu (tests/image: its VM, its network, its laptop).

    client ns (10.98.0.2) ──▶ vmnet (router) ──▶ VM 10.99.0.2 ──▶ vmnet ──▶ server ns (203.0.113.10)
    wireguard-go tunnels      the "WAN"          the exit node             iperf3 -s

Paths, each measured with iperf3 from the client to the server (TCP up = client
sends, TCP down = -R, UDP at a fixed rate for loss), one after the other in one
boot, `--rounds` times:

    meshpi        (a) the VM's exit node as the agent set it up: meshpi0 (kernel
                  WireGuard), table inet meshpi, its sysctls and fast paths
    meshpi_noft   (a) with the pref flowtable off (the agent's own table for it)
    reference     (b) wg-quick style by hand: kernel WireGuard `wgref` and one
                  masquerade rule, nothing else (meshpi's table out of the way)
    userspace     (c) the same with wireguard-go on the VM
    plain         (d) routed NAT, no tunnel: vmnet sends the client's packets for
                  the server to the VM, which masquerades them

The tunnels use meshpi's MTU (1280) on both ends, so the ratios compare the
forwarding, not the MTU. The client side is wireguard-go in every tunnel (this
host has no WireGuard module); the VM under TCG is the bottleneck by far.

While paths are measured, both agents are stopped (SIGSTOP), so neither moves a
path or rewrites a table between runs; the tables are swapped with `nft -f`.

wireguard-go and ethtool for the VM are not in the image: their arm64 binaries are
unpacked from trixie's debs (mmdebstrap --variant=extract, as image/imgtest's
make-disk does for wireguard-go), cached in /var/cache/meshpi-image, and copied
over SSH into /usr/local of the bench's own copy of the card.

The last line is one JSON object: per path Mbit/s up and down, UDP loss, the VM's
CPU per Gbit/s; meshpi_vs_reference (a/b), kernel_vs_userspace (b/c),
tunnel_vs_plain (b/d), flowtable_gain (a/a without flowtable) per direction; the
DF ping sweep (MTU/MSS) and the WAN's fragment count. Absolute figures under TCG
mean little: the ratios, measured side by side in one run, are the result.
Run it under `flock /tmp/meshpi-image.lock` (one VM at a time on this host).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from scripts.bench.dataplane_vm import BenchVm, boot_bench_vm, build_image
from tests.image.vmnet import SERVER_V4

# meshpi and its reference side by side, since their ratio is the result.
PATHS = ("meshpi", "reference", "meshpi_noft", "userspace", "plain")
IPERF_PORT = 5201


def iperf(
    vm: BenchVm, seconds: float, reverse: bool = False, udp_rate: str | None = None
) -> dict[str, float]:
    """One iperf3 run client -> server through whatever route the client has now,
    with the VM's CPU sampled around it."""
    cmd = [
        "iperf3",
        "-c",
        SERVER_V4,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(seconds),
        "-J",
        "--connect-timeout",
        "10000",
    ]
    if reverse:
        cmd.append("-R")
    if udp_rate is not None:
        cmd += ["-u", "-b", udp_rate, "-l", "1200"]  # fits a 1280 tunnel: no inner fragments
    with vm.cpu_sampler() as cpu:
        got = vm.net.client.run(cmd, check=False, timeout=seconds + 90)
    if got.returncode != 0:
        raise RuntimeError(f"iperf3 {' '.join(cmd[1:])}: {got.stdout[-800:]} {got.stderr[-800:]}")
    end = json.loads(got.stdout)["end"]
    if udp_rate is not None:
        mbps = end["sum"]["bits_per_second"] / 1e6
        out = {"mbps": mbps, "loss_pct": float(end["sum"]["lost_percent"])}
    else:
        mbps = end["sum_received"]["bits_per_second"] / 1e6
        out = {"mbps": mbps}
    busy = cpu.busy_cores()
    out["vm_cores_busy"] = busy
    out["cpu_per_gbps"] = busy / (mbps / 1000) if mbps > 0 else float("nan")
    return out


def measure(vm: BenchVm, path: str, seconds: float, udp_rate: str, udp: bool = True) -> dict[str, Any]:
    vm.select(path)
    up, down = iperf(vm, seconds), iperf(vm, seconds, reverse=True)
    row: dict[str, Any] = {
        "up_mbps": up["mbps"],
        "down_mbps": down["mbps"],
        "cpu_per_gbps_up": up["cpu_per_gbps"],
        "cpu_per_gbps_down": down["cpu_per_gbps"],
    }
    if udp:
        got = iperf(vm, seconds, udp_rate=udp_rate)
        row |= {"udp_mbps": got["mbps"], "udp_loss_pct": got["loss_pct"]}
    print(f"  {path:12} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    return row


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, float | None] | None:
    """a/b per direction; None when either path has no figures."""
    if a is None or b is None:
        return None
    return {d: round(a[f"{d}_mbps"] / b[f"{d}_mbps"], 3) if b[f"{d}_mbps"] else None for d in ("up", "down")}


def finite(value: Any) -> Any:
    """NaN (no traffic measured) as null: the last line stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--image", type=Path, help="a built image (default: scripts/build-image --no-compress)"
    )
    parser.add_argument("--seconds", type=float, default=10, help="each iperf3 run (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="every path this many times (median)")
    parser.add_argument("--udp-rate", default="20M", help="iperf3 -u -b for the loss figure (default 20M)")
    args = parser.parse_args()
    started = time.monotonic()
    image = args.image or build_image()
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    errors: dict[str, str] = {}
    with boot_bench_vm(image) as vm:
        print(
            f"dataplane: VM ready after {vm.boot_s:.0f} s; fast paths {json.dumps(vm.dataplane)}", flush=True
        )
        try:
            sweep = vm.df_sweep()
        except Exception as error:
            sweep, errors["df_sweep"] = {}, str(error)[-500:]
        print(f"dataplane: DF sweep through the exit node: {json.dumps(sweep)}", flush=True)
        for n in range(args.rounds):
            print(f"dataplane: round {n + 1}/{args.rounds} ({args.seconds:g} s per run)", flush=True)
            for path in PATHS:
                if path == "meshpi_noft" and not vm.dataplane.get("flowtable"):
                    continue  # no flowtable in this kernel: nothing to turn off
                try:
                    row = measure(vm, path, args.seconds, args.udp_rate, udp=path != "meshpi_noft")
                except Exception as error:  # one path failing must not lose the others' figures
                    print(f"dataplane: {path}: FAILED: {error}", flush=True)
                    errors[path] = str(error)[-500:]
                    continue
                results[path].append(row)
        fragments = vm.wan_fragments()
    paths = {p: median_rows(rows) for p, rows in results.items() if rows}
    a, b, c, d, noft = (paths.get(p) for p in ("meshpi", "reference", "userspace", "plain", "meshpi_noft"))
    out = {
        "meshpi_vs_reference": ratio(a, b),
        "kernel_vs_userspace": ratio(b, c),
        "tunnel_vs_plain": ratio(b, d),
        "flowtable_gain": ratio(a, noft),
        "cpu_per_gbps": {
            p: {"up": r["cpu_per_gbps_up"], "down": r["cpu_per_gbps_down"]} for p, r in paths.items()
        },
        "paths": paths,
        "mtu": sweep | {"wan_fragments": fragments},
        "dataplane": vm.dataplane,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "udp_rate": args.udp_rate,
        "vm_boot_s": round(vm.boot_s, 1),
        "total_s": round(time.monotonic() - started, 1),
        "errors": errors,
    }
    print()
    print(
        f"{'path':12} {'up Mbit/s':>10} {'down Mbit/s':>12} {'UDP loss %':>11}"
        f" {'CPU/Gbit/s up':>14} {'down':>6}"
    )
    for p, r in paths.items():
        loss = r.get("udp_loss_pct")
        loss_text = "" if loss is None else f"{loss:.2f}"
        print(f"{p:12} {r['up_mbps']:10.1f} {r['down_mbps']:12.1f} {loss_text:>11} "
              f"{r['cpu_per_gbps_up']:14.2f} {r['cpu_per_gbps_down']:6.2f}")  # fmt: skip
    print(json.dumps(finite(out)))


if __name__ == "__main__":
    main()

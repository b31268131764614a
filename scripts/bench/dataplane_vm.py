"""The VM side of scripts/bench/dataplane: the image booted on tests/image's network,
a laptop using it as exit node, the hand-made reference tunnels, and switching the
client's traffic from one path to the next.

Reuses tests/image: VmNet (namespaces, tap, DHCP), Vm (SSH, console), Laptop (the
meshpi agent + wireguard-go in the client namespace), GOOD_TOML (the first boot
creates a mesh and offers the exit node).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.image.machine import GOOD_TOML, HOSTNAME, REPO, VERSION, Laptop, Vm, node_id, run
from tests.image.vmnet import SERVER_V4, TAP, VM_V4, VmNet
from tests.lab.host import LabError, wait_for

CACHE = Path(os.environ.get("MESHPI_IMAGE_CACHE", "/var/cache/meshpi-image"))
# trixie arm64 packages whose binaries the bench copies into the VM (not the image):
# iperf3 runs outside the VM at both ends, the VM only forwards.
TOOL_PACKAGES = ("wireguard-go", "ethtool")
TOOL_FILES = ("usr/bin/wireguard-go", "usr/sbin/ethtool")
TOOLS = CACHE / f"bench-tools-arm64-{'-'.join(TOOL_PACKAGES)}.tar.gz"
MTU = 1280  # meshpi's default: every tunnel of the bench uses it, on both ends
REF_PORT, GO_PORT = 51900, 51901
REF_NET, GO_NET = "10.77.0", "10.76.0"
GRO = "rx-udp-gro-forwarding"
NAT = f"""table ip dpbench_nat {{}}
delete table ip dpbench_nat
table ip dpbench_nat {{
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {{ {REF_NET}.0/24, {GO_NET}.0/24, 10.98.0.0/24 }} oifname "eth0" masquerade
    }}
}}
"""
WAN_COUNTER = """table inet dpbench {
    chain forward_count {  # ("fwd" is a keyword in nft)
        type filter hook forward priority filter; policy accept;
        ip frag-off & 0x3fff != 0 counter comment "fragments"
    }
}
"""


def build_image() -> Path:
    print("dataplane: scripts/build-image --no-compress", flush=True)
    build = run(["scripts/build-image", "--no-compress"], timeout=3 * 3600)
    if build.returncode != 0:
        raise RuntimeError(f"build-image failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    return REPO / "out" / f"meshpi-{VERSION}-arm64.img"


def _mirror() -> str:
    if os.environ.get("MESHPI_MIRROR"):
        return os.environ["MESHPI_MIRROR"].rstrip("/")
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1].rstrip("/")
    raise RuntimeError("no Debian mirror in /etc/apt/sources.list.d/*.sources; set MESHPI_MIRROR")


def tools_tarball() -> Path:
    """wireguard-go and ethtool for arm64, unpacked from trixie's debs (cached)."""
    if TOOLS.exists():
        return TOOLS
    stage = Path(tempfile.mkdtemp(prefix="meshpi-bench-tools-", dir="/var/tmp"))
    try:
        subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--arch=arm64", "--variant=extract",
                        f"--include={','.join(TOOL_PACKAGES)}", "trixie", str(stage / "root"),
                        f"deb [arch=arm64] {_mirror()} trixie main"],
                       check=True, capture_output=True)  # fmt: skip
        files = [
            str(p.relative_to(stage / "root"))
            for pattern in TOOL_FILES
            for p in (stage / "root").glob(pattern)
        ]
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = TOOLS.with_suffix(".tmp")
        # Into /usr/local of the VM: usr/bin/x -> bin/x.
        tar = ["tar", "-czf", str(tmp), "-C", str(stage / "root"), "--transform", "s,^usr/,,"]
        subprocess.run([*tar, *files], check=True)
        tmp.rename(TOOLS)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return TOOLS


class CpuSample:
    """The VM's /proc/stat and uptime read over one SSH session before and after."""

    def __init__(self, vm: Vm) -> None:
        read = "head -1 /proc/stat; cut -d' ' -f1 /proc/uptime"
        script = f"{read}; read x; {read}"
        self.proc = subprocess.Popen(["ip", "netns", "exec", vm.net.vmnet.ns, *vm.ssh_cmd(script)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        self.before = (self.proc.stdout.readline(), self.proc.stdout.readline())
        self.after = ("", "")

    def stop(self) -> None:
        try:
            out, _ = self.proc.communicate("\n", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out = ""
        lines = out.splitlines()
        if len(lines) >= 2:
            self.after = (lines[0], lines[1])

    def busy_cores(self) -> float:
        """Cores busy on average between the two reads (user, system, irq, softirq, steal)."""

        def busy(line: str) -> int:
            f = [int(x) for x in line.split()[1:9]]
            return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]

        try:
            jiffies = busy(self.after[0]) - busy(self.before[0])
            seconds = float(self.after[1]) - float(self.before[1])
        except (ValueError, IndexError):  # the SSH session failed: no figure, not no run
            return float("nan")
        return jiffies / 100 / seconds if seconds > 0 else float("nan")


class BenchVm:
    def __init__(self, vm: Vm, boot_s: float) -> None:
        self.vm, self.net, self.boot_s = vm, vm.net, boot_s
        self.laptop = Laptop(vm, "bench", 51821)
        suffix = os.getpid() % 10000
        self.wg_ref, self.wg_go = f"dpb{suffix}", f"dpc{suffix}"  # the client's ends
        self.tables: dict[str, str] = {}
        self.dataplane: dict[str, Any] = {}
        self.meshpi_gro = "off"
        self.frozen = False

    # -- setup ------------------------------------------------------------------

    def setup(self) -> None:
        vm, net = self.vm, self.net
        tarball = base64.b64encode(tools_tarball().read_bytes()).decode()
        vm.ssh("base64 -d | tar -xzf - -C /usr/local && ldconfig", input=tarball, timeout=300)
        wait_for(lambda: bool(self._status().get("local_control", {}).get("login_url")), 600,
                 "the VM's mesh (create-mesh on first boot)", interval=5)  # fmt: skip
        vm.out(f"meshpi-control routes approve {node_id(vm, HOSTNAME)} 0.0.0.0/0 ::/0")
        net.server.popen(["iperf3", "-s", "-p", "5201"])
        net.server.whoami_server()
        net.vmnet.run(["nft", "-f", "-"], input=WAN_COUNTER)
        # The hand-made tunnels reach the VM's LAN address directly, while the laptop's
        # exit node takes everything else (its suppress rule lets a /24 in main win).
        net.client.run(["ip", "route", "add", "10.99.0.0/24", "via", "10.98.0.1"])
        self.laptop.start()
        self.laptop.up()
        self.laptop.set("--exit-node", HOSTNAME)
        wait_for(self.laptop.via_vm, 180, "the laptop's traffic to leave through the VM", interval=2)
        wait_for(self._direct, 180, "the laptop's tunnel to the VM on its direct path", interval=2)
        self.dataplane = self._status().get("dataplane") or {}
        self.meshpi_gro = vm.out(f"ethtool -k eth0 | sed -n 's/^{GRO}: \\([a-z]*\\).*/\\1/p'") or "off"
        self.tables["meshpi"] = vm.out("nft list table inet meshpi")
        if self.dataplane.get("flowtable"):
            self.tables["meshpi_noft"] = self._agent_table("--no-flowtable", want_flowtable=False)
            self._agent_table("--flowtable", want_flowtable=True)
        self._reference_tunnels()
        vm.out("sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.eth0.send_redirects=0")
        self._freeze(True)

    def _status(self) -> dict[str, Any]:
        got = self.vm.ssh("meshpi status --json", check=False, timeout=60)
        return json.loads(got.stdout) if got.returncode == 0 else {}

    def _direct(self) -> bool:
        endpoints = self.net.client.run(
            ["wg", "show", self.laptop.interface, "endpoints"], check=False
        ).stdout
        return f"{VM_V4}:51820" in endpoints

    def _agent_table(self, flag: str, want_flowtable: bool) -> str:
        self.vm.out(f"meshpi set {flag}")

        def switched() -> str | None:
            table = self.vm.out("nft list table inet meshpi")
            return table if ("flow add" in table) == want_flowtable else None

        return str(wait_for(switched, 120, f"the agent's table after meshpi set {flag}", interval=2))

    def _reference_tunnels(self) -> None:
        vm, client = self.vm, self.net.client
        keys = {n: client.run(["wg", "genkey"]).stdout.strip() for n in ("vm_ref", "vm_go", "c_ref", "c_go")}

        def pub(name: str) -> str:
            return client.run(["wg", "pubkey"], input=keys[name] + "\n").stdout.strip()

        vm.ssh(f"""set -e; umask 077
            echo {keys["vm_ref"]} > /run/dpbench-ref.key; echo {keys["vm_go"]} > /run/dpbench-go.key
            ip link add wgref type wireguard
            wg set wgref listen-port {REF_PORT} private-key /run/dpbench-ref.key \\
                peer {pub("c_ref")} allowed-ips {REF_NET}.2/32
            ip addr add {REF_NET}.1/24 dev wgref; ip link set wgref mtu {MTU} up
            LOG_LEVEL=error wireguard-go wggo0 </dev/null >/dev/null 2>&1
            wg set wggo0 listen-port {GO_PORT} private-key /run/dpbench-go.key \\
                peer {pub("c_go")} allowed-ips {GO_NET}.2/32
            ip addr add {GO_NET}.1/24 dev wggo0; ip link set wggo0 mtu {MTU} up""")  # fmt: skip
        for dev, key, peer, port, net in ((self.wg_ref, "c_ref", "vm_ref", REF_PORT, REF_NET),
                                          (self.wg_go, "c_go", "vm_go", GO_PORT, GO_NET)):  # fmt: skip
            keyfile = self.net.scratch / f"{dev}.key"
            keyfile.write_text(keys[key] + "\n")
            keyfile.chmod(0o600)
            client.run(["wireguard-go", dev], timeout=30)
            client.run(["wg", "set", dev, "private-key", str(keyfile), "peer", pub(peer),
                        "endpoint", f"{VM_V4}:{port}", "allowed-ips", "0.0.0.0/0"])  # fmt: skip
            client.run(["ip", "addr", "add", f"{net}.2/24", "dev", dev])
            client.run(["ip", "link", "set", dev, "mtu", str(MTU), "up"])

    def _freeze(self, frozen: bool) -> None:
        """Stop (or continue) both agents: while paths are measured neither may move
        the laptop's path to the relay nor put meshpi's table back."""
        sig = "SIGSTOP" if frozen else "SIGCONT"
        self.vm.ssh(f"systemctl kill -s {sig} meshpi-agent.service", check=False, timeout=60)
        if self.laptop.agent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.laptop.agent.pid, getattr(signal, sig))
        self.frozen = frozen

    # -- paths ------------------------------------------------------------------

    def select(self, path: str) -> None:
        """Send the client's traffic for the server along `path` (one of bench PATHS)."""
        vm, client, vmnet = self.vm, self.net.client, self.net.vmnet
        vmnet.run(["ip", "rule", "del", "pref", "100"], check=False)
        if path in ("meshpi", "meshpi_noft"):
            table = self.tables[path]
            vm.ssh("nft -f - && { nft delete table ip dpbench_nat 2>/dev/null || true; }"
                   f" && {{ ethtool -K eth0 {GRO} {self.meshpi_gro} 2>/dev/null || true; }}",
                   input=f"table inet meshpi {{}}\ndelete table inet meshpi\n{table}\n")  # fmt: skip
            client.run(["ip", "route", "del", f"{SERVER_V4}/32"], check=False)
        else:
            vm.ssh(
                f"nft delete table inet meshpi 2>/dev/null; ethtool -K eth0 {GRO} off 2>/dev/null; nft -f -",
                input=NAT,
            )
            if path == "plain":
                # `dev eth0` said outright: the laptop's exit-node rules send 10.98.0.0/24
                # to its tunnel's table, so a bare `via 10.98.0.1` resolved into the tunnel.
                client.run(["ip", "route", "replace", f"{SERVER_V4}/32", "via", "10.98.0.1", "dev", "eth0"])
                vmnet.run(["ip", "route", "replace", "default", "via", VM_V4, "dev", TAP, "table", "100"])
                vmnet.run(
                    ["ip", "rule", "add", "pref", "100", "iif", "client", "to", SERVER_V4, "lookup", "100"]
                )
            else:
                dev = self.wg_ref if path == "reference" else self.wg_go
                client.run(["ip", "route", "replace", f"{SERVER_V4}/32", "dev", dev])
        seen = self.net.client.fetch(SERVER_V4, timeout=10)
        if seen != VM_V4:
            raise RuntimeError(f"path {path}: the server sees {seen}, not the VM ({VM_V4})")

    @contextlib.contextmanager
    def cpu_sampler(self) -> Iterator[CpuSample]:
        sample = CpuSample(self.vm)
        try:
            yield sample
        finally:
            sample.stop()

    # -- MTU --------------------------------------------------------------------

    def df_sweep(self) -> dict[str, Any]:
        """DF pings from the client through the exit node: which sizes pass whole."""
        self.select("meshpi")
        sizes = (1200, 1232, 1252, 1253, 1372, 1472)
        passed = {}
        for size in sizes:
            ping = self.net.client.run(["ping", "-n", "-c", "2", "-i", "0.3", "-W", "3", "-M", "do",
                                        "-s", str(size),
                                        SERVER_V4], check=False, timeout=30)  # fmt: skip
            passed[size] = ping.returncode == 0
        largest = max((s for s, ok in passed.items() if ok), default=None)
        return {
            "tunnel_mtu": MTU,
            "df_ping_ok": {str(s): ok for s, ok in passed.items()},
            "largest_df_payload": largest,  # MTU - 28 when the whole tunnel MTU passes
            "wan_packet_for_full_inner": MTU + 60,  # + outer IPv4 20, UDP 8, WireGuard 32
        }

    def wan_fragments(self) -> int:
        listing = self.net.vmnet.run(["nft", "list", "table", "inet", "dpbench"]).stdout
        found = re.search(r"counter packets (\d+)", listing)
        return int(found[1]) if found else -1

    def teardown(self) -> None:
        if self.frozen:
            self._freeze(False)
        with contextlib.suppress(Exception):
            self.laptop.stop()


def _ssh_up(vm: Vm) -> bool:
    """Does the VM answer SSH (meshpi.toml's key applied) within a minute?"""

    def answers() -> bool:
        try:
            return vm.ssh("true", check=False, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    try:
        wait_for(answers, 90, "SSH", interval=5)
    except LabError:
        return False
    return True


@contextlib.contextmanager
def boot_bench_vm(image: Path) -> Iterator[BenchVm]:
    """Boot a throwaway copy of `image` (its first boot: creates a mesh, offers the
    exit node) on tests/image's network, and set the bench up around it."""
    work = Path(tempfile.mkdtemp(prefix="meshpi-bench-dataplane-", dir="/var/tmp"))
    try:
        monitor = work / "qemu-monitor.sock"
        card, key, toml, log = (
            work / "card.img",
            work / "id_ed25519",
            work / "meshpi.toml",
            work / "console.log",
        )
        subprocess.run(["cp", "--sparse=always", str(image), str(card)], check=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)], check=True
        )
        toml.write_text(
            GOOD_TOML.format(ssh=f'ssh_authorized_key = "{key.with_suffix(".pub").read_text().strip()}"')
        )
        with VmNet() as net:
            proc = net.vmnet.popen([str(REPO / "scripts/boot-image"), str(card), "--in-place",
                                    "--boot-file", f"meshpi.toml={toml}", "--net", f"tap:{TAP}",
                                    "--append-extra", "meshpi.imgtest=hold", "--log", str(log),
                                    "--monitor", str(monitor), "--timeout", "2700"],
                                   log=work / "boot-image.out")  # fmt: skip
            vm = Vm(net, key, log, proc, monitor)
            started = time.monotonic()
            print("dataplane: booting the image (first boot) under qemu", flush=True)
            vm.wait_held(1, 900)
            if not _ssh_up(vm):
                # On a host loaded by other VMs the first boot has been seen to skip
                # meshpi-firstboot (no SSH, no mesh): the card's second boot applies it,
                # as tests/image's second boot does.
                print(
                    "dataplane: no SSH after the first boot (firstboot skipped): resetting once", flush=True
                )
                vm.qemu("system_reset")
                vm.wait_held(2, 900)
            bench = BenchVm(vm, time.monotonic() - started)
            try:
                bench.setup()
                yield bench
            except BaseException:
                print(f"dataplane: console tail:\n{vm.console()[-3000:]}", flush=True)
                with contextlib.suppress(Exception):
                    print(f"dataplane: laptop log tail:\n{bench.laptop.log()[-3000:]}", flush=True)
                with contextlib.suppress(Exception):
                    bench._freeze(False)
                    journal = vm.ssh("journalctl -u meshpi-agent -n 80 --no-pager", check=False).stdout
                    print(f"dataplane: the VM agent's journal:\n{journal}", flush=True)
                raise
            finally:
                bench.teardown()
                vm.power_off(timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)

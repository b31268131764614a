"""What the image tier's test files share: the image's constants, a boot's console
(Boot) and the booted VM (Vm). The fixtures that make them are in conftest.py."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.image.vmnet import SERVER_V4, VM_V4, VmNet
from tests.lab.host import LabError, wait_for

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
FAT_OFFSET, ROOT_OFFSET = 4194304, 536870912  # scripts/build-image
HOSTNAME = "meshpi-vm"
ADMIN_PASSWORD = "first-boot-secret-1"
WIFI_PASSWORD = "wifi-secret-42"
# What this run took, printed by test_image_timings and written to out/image-test-timings.json.
TIMINGS: dict[str, float] = {}

BAD_TOML = f"""hostname = "{HOSTNAME}"
admin_password = "{ADMIN_PASSWORD}"
{{ssh}}
[wifi]
ssid = "home"
password = "{WIFI_PASSWORD}"
country = "Germany"
"""
GOOD_TOML = BAD_TOML.replace('"Germany"', '"DE"') + '\n[mesh]\nmode = "create"\n'
HOLD = "MESHPI-IMGTEST: HOLD"


@dataclass(frozen=True)
class Boot:
    console: str
    result: dict[str, Any]
    returncode: int

    def lines(self) -> str:
        return "\n".join(line for line in self.console.splitlines() if "MESHPI-IMGTEST:" in line)

    def facts(self) -> dict[str, str]:
        return dict(re.findall(r"MESHPI-IMGTEST: fact ([^=\s]+)=(.*?)\r?$", self.console, re.MULTILINE))


def last_json(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    assert lines, "no output"
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


class Vm:
    """The second boot's VM, held up for the session (meshpi.imgtest=hold): SSH into it,
    its console log, and its qemu monitor (a unix socket) for a hard reset."""

    def __init__(
        self,
        net: VmNet,
        key: Path,
        log: Path,
        proc: subprocess.Popen[bytes] | None = None,
        monitor: Path | None = None,
    ) -> None:
        self.net, self.key, self.log = net, key, log
        self.proc, self.monitor = proc, monitor

    def ssh_cmd(self, command: str) -> list[str]:
        """The ssh command line (to run in the vmnet namespace) for `command` in the VM."""
        opts = ["-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]  # fmt: skip
        return ["ssh", *opts, f"root@{VM_V4}", command]

    def ssh(
        self, command: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.net.vmnet.run(self.ssh_cmd(command), check=check, timeout=timeout, input=input)

    def answers(self) -> bool:
        """Does SSH log in now?"""
        try:
            return self.ssh("true", check=False, timeout=60).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def out(self, command: str) -> str:
        return self.ssh(command).stdout.strip()

    def console(self) -> str:
        """The serial console so far ("" until boot-image has made the file)."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def holds(self) -> int:
        """How many times the self-test said HOLD: once per boot of this VM."""
        return self.console().count(HOLD)

    def running(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def qemu(self, command: str) -> str:
        """One human-monitor command (e.g. system_reset), its answer."""
        if self.monitor is None:
            raise LabError("this VM was booted without a qemu monitor")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.monitor))
            banner = b""
            while b"(qemu)" not in banner:
                banner += sock.recv(4096)
            sock.sendall(command.encode() + b"\n")
            answer = b""
            while answer.count(b"(qemu)") < 1:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer.decode(errors="replace")

    def power_off(self, timeout: float = 300) -> None:
        """Shut the VM down cleanly and wait for qemu to end."""
        self.ssh("systemctl --no-block poweroff", check=False, timeout=30)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.net.stop_process(self.proc)

    def wait_held(self, boots: int, timeout: float) -> float:
        """Wait for the self-test's HOLD of boot number `boots`; seconds it took."""
        started = time.monotonic()

        def held() -> bool:
            if not self.running():
                raise LabError(f"the VM stopped:\n{self.console()[-3000:]}")
            return self.holds() >= boots

        wait_for(held, timeout, f"the self-test's HOLD #{boots}", interval=1)
        # HOLD comes after multi-user.target, but on the boot that applied meshpi.toml
        # first boot starts ssh.service with --no-block, outside that transaction: sshd
        # may listen a little later (a -k run's first test saw "Connection refused").
        wait_for(self.answers, 300, "SSH", interval=2)
        return round(time.monotonic() - started, 1)


MESHPI = str(REPO / ".venv/bin/meshpi")


class Laptop:
    """A laptop outside the VM: wireguard-go and the meshpi agent in the client
    namespace, joined to the VM's mesh with an auth key from the VM's control."""

    def __init__(self, vm: Vm, name: str, port: int = 51820) -> None:
        self.vm, self.name, self.port = vm, name, port
        self.state = vm.net.scratch / name
        self.interface = f"mp{name[:4]}{os.getpid() % 10000}"
        self.local = ["--state-dir", str(self.state), "--local-api", str(self.state / "local.sock")]
        self.agent: subprocess.Popen[bytes] | None = None

    def start(self) -> Laptop:
        self.vm.net.internet()  # what via_vm() asks
        self.state.mkdir(mode=0o700)
        self.agent = self.vm.net.client.popen(
            [MESHPI, "agent", *self.local], log=self.vm.net.scratch / f"{self.name}-agent.log"
        )
        wait_for(lambda: (self.state / "local.sock").exists(), 30, f"{self.name}'s agent")
        return self

    def up(self, *flags: str) -> None:
        status = json.loads(self.vm.out("meshpi status --json"))
        login = status["local_control"]["login_url"]
        auth_key = self.vm.out("meshpi-control keys create --expires 600").splitlines()[-1]
        up = self.vm.net.client.run([MESHPI, "up", "--login-server", login, "--auth-key", auth_key,
                                     "--hostname", self.name, "--backend", "userspace",
                                     "--interface", self.interface, "--listen-port", str(self.port),
                                     *flags, *self.local],
                                    check=False, timeout=90)  # fmt: skip
        assert up.stdout.startswith("connected"), up.stdout + up.stderr

    def set(self, *flags: str) -> None:
        self.vm.net.client.run([MESHPI, "set", *flags, *self.local], timeout=60)

    def status(self) -> dict[str, Any]:
        got: dict[str, Any] = json.loads(
            self.vm.net.client.run([MESHPI, "status", "--json", *self.local]).stdout
        )
        return got

    def via_vm(self) -> bool:
        """Does the laptop's traffic to the internet leave through the VM?"""
        try:
            return self.vm.net.client.fetch(SERVER_V4, timeout=3) == VM_V4
        except LabError:
            return False

    def log(self) -> str:
        return (self.vm.net.scratch / f"{self.name}-agent.log").read_text(errors="replace")

    def diagnose(self) -> str:
        """Both ends of the laptop's tunnel, for a failure message: the VM's agent and
        kernel state and the laptop's."""
        vm_side = "; ".join([
            "meshpi status --json", "wg show meshpi0", "ip rule", "ip route show table 51820",
            "nft list ruleset | head -80", "systemctl --failed --no-legend",
            "journalctl -b -u meshpi-agent.service -u meshpi-control.service --no-pager -o short-monotonic | tail -60",
        ])  # fmt: skip
        got = self.vm.ssh(vm_side, check=False, timeout=60)
        laptop = self.vm.net.client.run(
            ["sh", "-c", f"wg show {self.interface}; ip rule; ip route show table all | grep -v local"],
            check=False,
        )
        return (f"--- the VM:\n{got.stdout}{got.stderr}\n--- the laptop:\n{laptop.stdout}{laptop.stderr}"
                f"\n--- the laptop's agent log:\n{self.log()[-4000:]}")  # fmt: skip

    def stop(self) -> None:
        # `down` takes the state directory only (it stops the agent by its pid file): it
        # removes wireguard-go's interface, the policy rules and table 51820, which a
        # killed agent leaves behind for the next laptop in this namespace to trip on.
        down = self.vm.net.client.run(
            [MESHPI, "down", "--state-dir", str(self.state)], check=False, timeout=60
        )
        if down.returncode != 0:
            log.warning("%s: meshpi down: %s", self.name, down.stderr.strip())
        if self.agent is not None:
            self.vm.net.stop_process(self.agent)
            self.agent = None


def node_id(vm: Vm, name: str) -> str:
    """The id of the node called `name` in the VM's control (meshpi-control nodes list)."""
    nodes = vm.out("meshpi-control nodes list")
    found = [line.split()[0] for line in nodes.splitlines()[1:] if line.split()[1:2] == [name]]
    assert found, f"no node {name!r} in the VM's control:\n{nodes}"
    return found[-1]


def exit_ready_s(vm: Vm) -> float:
    """Seconds from this boot's kernel start to the agent's first apply (its log line
    "... meshpi0 is up" or "took over meshpi0"): the exit node is ready."""
    journal = vm.out(
        "journalctl -b -u meshpi-agent.service -o short-monotonic --no-pager | grep -E 'is up|took over' | head -1"
    )
    found = re.match(r"\[\s*([0-9.]+)\]", journal)
    assert found, journal
    return round(float(found[1]), 1)

"""What the image tier's test files share: the image's constants, a boot's console
(Boot) and the booted VM (Vm). The fixtures that make them are in conftest.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.image.vmnet import VM_V4, VmNet
from tests.lab.host import LabError, wait_for

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

    def ssh(self, command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        opts = ["-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]  # fmt: skip
        return self.net.vmnet.run(["ssh", *opts, f"root@{VM_V4}", command], check=check, timeout=timeout)

    def out(self, command: str) -> str:
        return self.ssh(command).stdout.strip()

    def console(self) -> str:
        return self.log.read_text(errors="replace")

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

    def wait_held(self, boots: int, timeout: float) -> float:
        """Wait for the self-test's HOLD of boot number `boots`; seconds it took."""
        started = time.monotonic()

        def held() -> bool:
            if not self.running():
                raise LabError(f"the VM stopped:\n{self.console()[-3000:]}")
            return self.holds() >= boots

        wait_for(held, timeout, f"the self-test's HOLD #{boots}", interval=1)
        return round(time.monotonic() - started, 1)

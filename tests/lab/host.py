"""Hosts of the lab: one network namespace each, with helpers to run the lab tools in it.

Processes started with Host.popen() belong to the lab and die at its teardown.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.lab import netns

if TYPE_CHECKING:
    from tests.lab.topology import Lab

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
WHOAMI_PORT = 8080
WIREGUARD_PORT = 51820


class LabError(RuntimeError):
    """The lab could not be built, or a lab tool failed."""


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_avg_ms: float | None  # None when nothing came back


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


def parse_ping(text: str) -> PingResult:
    counts = _PING_COUNTS.search(text)
    if counts is None:
        raise LabError(f"no ping summary in {text!r}")
    rtt = _PING_RTT.search(text)
    return PingResult(int(counts[1]), int(counts[2]), float(rtt[1]) if rtt else None)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll until predicate() is truthy and return its value; LabError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ToolServer:
    """A `tests.lab.tools` server running in a host; its event log is key=value lines."""

    def __init__(self, host: Host, proc: subprocess.Popen[bytes], log_path: Path, out: Path):
        self.host, self.proc, self.log, self._out = host, proc, log_path, out

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def events(self) -> list[dict[str, str]]:
        return [dict(f.split("=", 1) for f in ln.split() if "=" in f) for ln in self.lines()]

    def peers(self) -> list[str]:
        """The peer address of every request served so far, oldest first."""
        return [e["peer"] for e in self.events() if "peer" in e]

    def wait_ready(self, timeout: float = 5.0) -> ToolServer:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise LabError(f"{self.host.role}: server exited: {self._out.read_text()[-500:]}")
            return any(line.startswith("listening") for line in self.lines())

        wait_for(ready, timeout, f"server in {self.host.ns}")
        return self

    def stop(self) -> None:
        self.host.lab.stop_process(self.proc)


class Host:
    """One namespace of the lab. Commands run inside it; background processes die with the lab."""

    def __init__(self, lab: Lab, role: str, ns: str) -> None:
        self.lab, self.role, self.ns = lab, role, ns

    def __repr__(self) -> str:
        return f"Host({self.role!r}, ns={self.ns!r})"

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        try:
            return netns.run(self.ns, cmd, check=check, timeout=timeout, **kw)
        except subprocess.CalledProcessError as exc:
            raise LabError(
                f"{self.role}: {' '.join(cmd)} failed ({exc.returncode}): {exc.stderr.strip()}"
            ) from exc

    def popen(self, cmd: Sequence[str], log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start cmd in the background; stdout+stderr go to log (default: in the scratch dir)."""
        if log is None:
            log = self.lab.scratch / f"{self.role}-{Path(cmd[0]).name}-{len(self.lab.procs)}.log"
        with open(log, "ab") as out:
            # Own session: a Ctrl-C at the terminal reaches only us, and teardown
            # decides the order in which background processes die.
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
            )
        self.lab.procs.append(proc)
        logger.debug("%s: started pid %d: %s", self.role, proc.pid, " ".join(cmd))
        return proc

    def sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    # -- the tools of tests.lab.tools, run with this interpreter (the venv's) --

    def _tool(self, args: Sequence[str], timeout: float) -> str:
        cmd = [sys.executable, "-m", "tests.lab.tools", *args]
        res = self.run(cmd, check=False, timeout=timeout + 5, cwd=REPO_ROOT)
        if res.returncode != 0:
            raise LabError(f"{self.role}: {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout.strip()

    def _server(self, kind: str, port: int) -> ToolServer:
        name = f"{self.role}-{kind}-{port}"
        log_path, out = self.lab.scratch / f"{name}.log", self.lab.scratch / f"{name}.out"
        args = [kind, "--port", str(port), "--log", str(log_path)]
        proc = self.popen([sys.executable, "-m", "tests.lab.tools", *args], log=out)
        return ToolServer(self, proc, log_path, out).wait_ready()

    def whoami_server(self, port: int = WHOAMI_PORT) -> ToolServer:
        return self._server("serve", port)

    def udp_echo_server(self, port: int = WIREGUARD_PORT) -> ToolServer:
        return self._server("udp-echo", port)

    def fetch(self, dst: str, request: str = "whoami", port: int = WHOAMI_PORT, timeout: float = 5) -> str:
        """One request to a whoami server; returns what the client printed."""
        return self._tool(["fetch", dst, str(port), request, "--timeout", str(timeout)], timeout)

    def fetch_or_none(self, dst: str, timeout: float = 1) -> str | None:
        """fetch(), or None when nothing answered (for polling a path that comes and goes)."""
        try:
            return self.fetch(dst, timeout=timeout)
        except LabError:
            return None

    def udp(self, dst: str, port: int, message: str = "hello", timeout: float = 2) -> str:
        return self._tool(["udp", dst, str(port), message, "--timeout", str(timeout)], timeout)

    def ping_result(self, dst: str, count: int = 3, interval: float = 0.2, wait: float = 1) -> PingResult:
        # ping exits 1 when nothing came back; the summary says so, so don't check.
        cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), dst]
        res = self.run(cmd, check=False, timeout=count * interval + wait + 10)
        return parse_ping(res.stdout)

    def ping(self, dst: str, count: int = 3, interval: float = 0.2) -> tuple[int, int]:
        """(sent, received)"""
        result = self.ping_result(dst, count, interval)
        return result.sent, result.received

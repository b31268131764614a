"""Power-loss cycles: `kill -9` the agent and control while they write their state.

One namespace holds meshpi-control (127.0.0.1:8443) and one agent in control mode
(userspace backend). Each cycle starts whatever is down, lets writers run for a
random moment (prefs through the LocalAPI, hosted devices added and removed, a
key rotation now and then, routes approved and pre-auth keys made through
control's admin API: control's SQLite database takes registrations and updates),
then SIGKILLs the agent (always), control (most cycles) and wireguard-go (some),
and checks what is on disk:

- every state file loads with the agent's own loaders; none is empty;
- no temporary file of an interrupted atomic write is left over (counted);
- control's database passes `PRAGMA integrity_check`.

At the end both start once more and the node must come back as itself: the same
machine key, its mesh addresses unchanged since the first cycle, and the node
key on disk is the one control and the kernel use.

`run(cycles)` is shared by tests/netns/test_powerloss.py (a few cycles) and
scripts/bench/powerloss (1,000).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey as NaclPrivateKey

from appliance.agent.control.link import Login
from appliance.agent.devices.hosted import load_devices
from appliance.agent.statedir import StateDir
from appliance.base.keys import PrivateKey
from appliance.client.localapi import LocalClient
from appliance.control.cli import admin_call
from appliance.control.keys import read_admin_token
from appliance.core.prefs import load_prefs
from appliance.kernel.real import SYSCTL_ORIGINALS
from appliance.wire.loginurl import login_url
from appliance.wire.netmap import load_netmap
from appliance.wire.seal import MachineKey
from tests.lab import netns
from tests.lab.host import REPO_ROOT, LabError

BIN = REPO_ROOT / ".venv" / "bin"
CONTROL = "http://127.0.0.1:8443"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Tally:
    cycles: int = 0
    agent_kills: int = 0
    control_kills: int = 0
    wireguard_kills: int = 0
    writes: dict[str, int] = field(default_factory=dict)
    temp_after_kill: int = 0  # expected: a kill between mkstemp and rename
    temp_after_restart: int = 0  # not expected: the agent removes them at start
    problems: list[str] = field(default_factory=list)
    restart_seconds: list[float] = field(default_factory=list)

    def wrote(self, what: str) -> None:
        self.writes[what] = self.writes.get(what, 0) + 1


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll until predicate() is truthy; an exception counts as "not yet" (a process starting)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    raise LabError(f"timed out after {timeout:g}s waiting for {what}; last error: {last}")


def in_namespace(name: str) -> None:
    """Move the calling thread (only) into the namespace: HTTP to control's 127.0.0.1."""
    with open(netns.NETNS_DIR / name, "rb") as f:
        if _libc.setns(f.fileno(), 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")


class Rig:
    def __init__(self, scratch: Path, ns: str, interface: str, seed: int = 1) -> None:
        self.scratch, self.ns, self.interface = scratch, ns, interface
        self.state = StateDir(scratch / "node")
        self.control_state = scratch / "control"
        self.sock = scratch / "node" / "local.sock"
        self.agent: subprocess.Popen[bytes] | None = None
        self.control: subprocess.Popen[bytes] | None = None
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.devices = 0
        self.partial: set[Path] = set()  # temporary files seen after the last kill

    # -- processes ----------------------------------------------------------------

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.scratch / log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], stdout=out, stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def start_control(self) -> None:
        if self.control is not None and self.control.poll() is None:
            return
        self.control = self._spawn([str(BIN / "meshpi-control"), "--state-dir", str(self.control_state),
                                    "serve", "--listen", "127.0.0.1:8443"], "control.log")  # fmt: skip
        wait_for(self._control_up, 20, "control to listen")

    def _control_up(self) -> bool:
        ss = netns.run(self.ns, ["ss", "-ltn", "sport = :8443 or sport = :8081"]).stdout
        return ss.count("LISTEN") >= 2 and (self.control_state / "admin.url").exists()

    def start_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            return
        self.agent = self._spawn([str(BIN / "meshpi"), "agent", "--state-dir", str(self.state.path),
                                  "--local-api", str(self.sock)], "agent.log")  # fmt: skip
        wait_for(lambda: self.api(2).get("/v1/status") is not None, 20, "the agent's LocalAPI")

    def api(self, timeout: float = 20) -> LocalClient:
        return LocalClient(self.sock, timeout)

    def admin(self, method: str, path: str, body: object = None) -> Any:
        # control's admin listener (a free loopback port, written to admin.url by control)
        url = (self.control_state / "admin.url").read_text().strip()
        return admin_call(url, read_admin_token(self.control_state), method, path, body)

    def kill(self, proc: subprocess.Popen[bytes] | None) -> bool:
        if proc is None or proc.poll() is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return True

    def kill_wireguard(self) -> bool:
        """The agent's wireguard-go (found by pid in our namespace), as a power cut would."""
        killed = False
        for pid in netns.pids(self.ns):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if cmdline[0].endswith(b"wireguard-go") and self.interface.encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed = True
        return killed

    def close(self) -> None:
        self.kill(self.agent)
        self.kill_wireguard()
        self.kill(self.control)

    # -- joining ------------------------------------------------------------------

    def join(self) -> dict[str, Any]:
        """Control, the agent, `up` with a pre-auth key: the node's status."""
        self.start_control()
        self.start_agent()
        key = base64.b64decode((self.control_state / "control.key").read_text().strip())
        login = login_url(CONTROL, NaclPrivateKey(key).public_key)
        auth = self.admin("POST", "/admin/v1/keys", {"reusable": True, "expires_in": 3600})["key"]
        res = netns.run(self.ns, [str(BIN / "meshpi"), "up", "--login-server", login, "--auth-key", auth,
                                  "--hostname", "victim", "--backend", "userspace", "--interface",
                                  self.interface, "--advertise-routes", "10.9.0.0/24",
                                  "--no-port-mapping", "--state-dir", str(self.state.path), "--local-api", str(self.sock)],
                        check=False)  # fmt: skip
        if not res.stdout.startswith("connected"):
            raise AssertionError(f"meshpi up: {res.stdout}{res.stderr}")
        return self.connected()

    def connected(self, timeout: float = 30) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            status = self.api(3).get("/v1/status")
            me = status.get("self") or {}
            return status if me.get("addresses") and self.interface in json.dumps(status) else None

        return wait_for(ready, timeout, "the node to be connected")  # type: ignore[no-any-return]

    # -- writers ------------------------------------------------------------------

    def _one_write(self, rng: random.Random) -> None:
        what = rng.choice(["prefs", "prefs", "device_add", "device_remove", "rotate", "approve", "authkey"])
        if what == "prefs":
            routes = [f"10.9.{rng.randrange(256)}.0/24" for _ in range(rng.randrange(1, 4))]
            self.api(5).patch("/v1/prefs", {"advertise_routes": routes, "keepalive": rng.choice([15, 25])})
        elif what == "device_add":
            self.devices += 1
            self.api(10).post(
                "/v1/devices", {"name": f"phone{self.devices}", "endpoint": "198.51.100.7:51820"}
            )
        elif what == "device_remove":
            listing = self.api(5).get("/v1/devices")["devices"]
            if listing:
                self.api(10).delete(f"/v1/devices/{rng.choice(listing)['id']}")
        elif what == "rotate":
            if rng.random() > 0.3:  # a rotation is heavier: not every time
                return
            self.api(20).post("/v1/rotate-key", {}, timeout=20)
        elif what == "approve":
            for node in self.admin("GET", "/admin/v1/nodes"):
                routes = node.get("advertised_routes") or []
                if routes:
                    self.admin("POST", f"/admin/v1/nodes/{node['id']}/routes", {"approved_routes": routes})
        else:
            self.admin("POST", "/admin/v1/keys", {"reusable": False, "expires_in": 600})
        self.tally.wrote(what)

    def writers(self, stop: threading.Event, seed: int) -> None:
        in_namespace(self.ns)
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                self._one_write(rng)
            except Exception:  # noqa: BLE001 - the kill lands mid-request: that is the point
                time.sleep(0.01)

    # -- one cycle ------------------------------------------------------------------

    def cycle(self) -> None:
        t0 = time.monotonic()
        self.start_control()
        self.start_agent()
        self.tally.restart_seconds.append(time.monotonic() - t0)
        for path in self.partial:
            if path.exists():
                self.tally.temp_after_restart += 1
                self.tally.problems.append(f"cycle {self.tally.cycles}: {path.name} outlived the restart")
                path.unlink()
        self.partial.clear()
        stop = threading.Event()
        threads = [threading.Thread(target=self.writers, args=(stop, self.rng.randrange(1 << 30)))
                   for _ in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(self.rng.uniform(0.05, 0.8))  # the moment of the cut is the random part
        if self.agent is not None and self.agent.poll() is not None:
            tail = (self.scratch / "agent.log").read_text(errors="replace").splitlines()[-3:]
            self.tally.problems.append(f"cycle {self.tally.cycles + 1}: the agent exited by itself "
                                       f"({self.agent.returncode}): {' | '.join(tail)}")  # fmt: skip
        self.tally.agent_kills += self.kill(self.agent)
        if self.rng.random() < 0.7:
            self.tally.control_kills += self.kill(self.control)
        if self.rng.random() < 0.3:
            self.tally.wireguard_kills += self.kill_wireguard()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        self.tally.cycles += 1
        for problem in self.check():
            self.tally.problems.append(f"cycle {self.tally.cycles}: {problem}")

    def check(self) -> list[str]:
        """What is wrong on disk right now (both processes may be dead)."""
        problems: list[str] = []
        s = self.state
        loaders: dict[Path, Callable[[Path], object]] = {
            s.prefs_file: load_prefs,
            s.devices_file: load_devices,
            s.netmap_file: load_netmap,
            s.key_file: lambda p: PrivateKey.from_base64(p.read_text()),
            s.next_key_file: lambda p: PrivateKey.from_base64(p.read_text()),
            s.machine_key_file: lambda p: MachineKey.from_text(p.read_text()),
            s.login_file: Login.load,
            s.control_pin_file: lambda p: json.loads(p.read_text()),
            s.owned_file: lambda _p: s.owned(),
            s.path / SYSCTL_ORIGINALS: lambda p: json.loads(p.read_text()),
        }
        for path in sorted(s.path.iterdir()):
            if path.name.startswith("."):
                self.tally.temp_after_kill += 1
                self.partial.add(path)
                continue
            if path.name in ("agent.pid", "local.sock"):
                continue  # a lock file (may be empty while taken) and a socket
            if path.stat().st_size == 0:
                problems.append(f"{path.name} is empty")
                continue
            loader = loaders.get(path)
            if loader is None:
                problems.append(f"unknown file {path.name}")
                continue
            try:
                loader(path)
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f"{path.name} does not load: {e}")
        for path in sorted(self.control_state.iterdir()):
            if path.name.startswith("."):
                problems.append(f"control: left over: {path.name}")
            elif path.stat().st_size == 0 and not path.name.endswith(("-wal", "-shm")):
                problems.append(f"control: {path.name} is empty")
        db = self.control_state / "control.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            problems.append(f"control.db integrity_check: {verdict}")
        return problems


def run(
    scratch: Path, cycles: int, seed: int = 1, progress: Callable[[Tally], None] | None = None
) -> dict[str, Any]:
    """Join, `cycles` cuts, then the node must come back as itself. Returns figures.
    Runs on a thread of its own inside the namespace (control's admin API is on
    the namespace's loopback); processes are started with `ip netns exec`."""
    ns = f"mpl{os.getpid()}"
    netns.create(ns)
    result: list[dict[str, Any]] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            in_namespace(ns)
            result.append(_run(scratch, ns, cycles, seed, progress))
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    try:
        worker = threading.Thread(target=body, name="powerloss")
        worker.start()
        worker.join()
    finally:
        netns.delete(ns)
    if failure:
        raise failure[0]
    return result[0]


def _run(
    scratch: Path, ns: str, cycles: int, seed: int, progress: Callable[[Tally], None] | None
) -> dict[str, Any]:
    rig = Rig(scratch, ns, f"mpl{os.getpid() % 100000}", seed)
    try:
        first = rig.join()
        machine = rig.state.machine_key().public_key()
        addresses = first["self"]["addresses"]
        started = time.monotonic()
        for _ in range(cycles):
            rig.cycle()
            if progress is not None:
                progress(rig.tally)
        elapsed = time.monotonic() - started
        rig.start_control()
        rig.start_agent()
        rig.connected(60)

        def comeback() -> dict[str, Any]:
            me = rig.api(5).get("/v1/status")["self"]
            on_disk = rig.state.node_key().public_key()
            wg = netns.run(ns, ["wg", "show", rig.interface, "public-key"]).stdout.strip()
            listed = rig.admin("GET", "/admin/v1/nodes")
            return {
                "same_machine_key": rig.state.machine_key().public_key() == machine,
                "same_addresses": me["addresses"] == addresses,
                "node_key_is_used": str(on_disk) == me["public_key"] == wg,
                "one_node_at_control": len(listed) == 1 and listed[0]["node_key"] == str(on_disk),
                "no_rotation_pending": not rig.state.rotation_pending(),
            }

        try:  # a rotation cut short resumes after the restart: give it a moment
            back = wait_for(lambda: all((c := comeback()).values()) and c, 30, "the node to come back")
        except LabError:
            back = comeback()
        t = rig.tally
        restarts = sorted(t.restart_seconds)
        return {
            "cycles": t.cycles,
            "seconds": round(elapsed, 1),
            "agent_kills": t.agent_kills,
            "control_kills": t.control_kills,
            "wireguard_kills": t.wireguard_kills,
            "writes": t.writes,
            "temp_after_kill": t.temp_after_kill,
            "temp_after_restart": t.temp_after_restart,
            "problems": t.problems[:20],
            "problem_count": len(t.problems),
            "restart_p50_s": round(restarts[len(restarts) // 2], 2) if restarts else None,
            "comeback": back,
        }
    finally:
        rig.close()

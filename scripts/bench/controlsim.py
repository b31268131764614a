"""The control benchmarks' simulated nodes (control.py, soak.py, flood.py): each says
hello, registers, syncs and long-polls `map` as the agent does, over sealed requests;
a sample of them patches a real netmap with every delta. Also the server's process
(start, wait until it answers) and /proc readings of it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from nacl.public import Box

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.wire.mapdelta import patched  # noqa: E402
from appliance.wire.netmap import Netmap, parse_netmap  # noqa: E402
from appliance.wire.seal import (  # noqa: E402
    VERSION,
    BadResponse,
    ControlPublicKey,
    MachineKey,
    b64,
    decode_json_object,
    encode_json,
    make_nonce,
    open_response,
    seal_request,
)
from scripts.bench.leanhttp import LeanConnection, LeanError  # noqa: E402

APPLY_SAMPLE = 20  # nodes that patch a real Netmap with every delta


def key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rss_mb(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM (peak) of a process, MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status} {text}")
        self.status = status


@dataclass
class SimNode:
    """One simulated agent: its keys, its session, what it has heard."""

    index: int
    machine: MachineKey
    node_pub: str
    control: ControlPublicKey
    box: Box = field(init=False, repr=False)
    machine_raw: bytes = field(init=False)
    session: str | None = None
    number: int = 0
    version: int | None = None
    netmap: Netmap | None = None  # only the apply-delta sample keeps one
    polling: bool = False
    conn: LeanConnection | None = None

    def __post_init__(self) -> None:
        # One Box per node: seal_request/open_response build it (three X25519
        # operations) on every call, which at 5,000 nodes would make the
        # simulator, not the server, the bottleneck. Same bytes on the wire.
        self.box = Box(self.machine.nacl(), self.control.nacl())
        self.machine_raw = self.machine.public_raw()

    def seal(self, plaintext: dict[str, Any], number: int) -> tuple[bytes, bytes]:
        nonce = make_nonce(number)
        return bytes([VERSION]) + self.machine_raw + bytes(
            self.box.encrypt(encode_json(plaintext), nonce)
        ), nonce

    def open(self, data: bytes, nonce: bytes) -> dict[str, Any]:
        doc = decode_json_object(self.box.decrypt(data))
        if doc.get("re") != b64(nonce):
            raise BadResponse("answer is for another request")
        body = doc.get("body")
        if not isinstance(body, dict):
            raise BadResponse("answer body is not an object")
        return body


class Sim:
    def __init__(self, url: str, token: str, http: aiohttp.ClientSession, admin_url: str = "") -> None:
        self.url, self.token, self.http = url, token, http
        self.admin_url = admin_url or url  # the admin API and /metrics listen on loopback apart
        self.received: dict[int, tuple[float, int]] = {}  # node -> (arrival, response bytes)
        self.expect: str | None = None  # the route the current change adds
        self.changer_pub = ""
        self.stop = asyncio.Event()
        self.applied = 0
        self.deferred: list[tuple[SimNode, dict[str, Any]]] = []
        self.polls = 0
        self.errors: list[str] = []

    async def admin(self, method: str, path: str, body: object = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.request(method, self.admin_url + path, json=body, headers=headers) as resp:
            if resp.status >= 300:
                raise Refused(resp.status, await resp.text())
            return await resp.json()

    async def post(self, op: str, data: bytes, node: SimNode) -> tuple[bytes, float]:
        """The sealed answer and its arrival time. Long-polls go over the node's own
        lean keep-alive connection (leanhttp.py), the rest through aiohttp."""
        if op == "map":
            if node.conn is None:
                host, _, port = self.url.removeprefix("http://").partition(":")
                node.conn = LeanConnection(host, int(port))
            try:
                status, payload, arrived = await node.conn.post("/v1/map", data, timeout=120)
            except (OSError, LeanError) as e:
                raise aiohttp.ClientError(str(e)) from None
        else:
            async with self.http.post(f"{self.url}/v1/{op}", data=data) as resp:
                payload = await resp.read()
                status, arrived = resp.status, time.monotonic()
        if status != 200:
            raise Refused(status, payload.decode(errors="replace"))
        return payload, arrived

    async def hello(self, node: SimNode) -> None:
        data, nonce = seal_request(node.machine, node.control, {"op": "hello"}, 0)
        body = open_response(node.machine, node.control, (await self.post("hello", data, node))[0], nonce)
        node.session, node.number = body["session"], 0

    async def call(self, node: SimNode, op: str, body: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
        """A sealed op; returns (answer body, sealed answer size, arrival time)."""
        for attempt in (1, 2):
            if node.session is None:
                await self.hello(node)
            node.number += 1
            plaintext = {"op": op, "session": node.session, "body": body}
            if node.index < APPLY_SAMPLE:  # the sample goes through seal.py's own functions
                data, nonce = seal_request(node.machine, node.control, plaintext, node.number)
            else:
                data, nonce = node.seal(plaintext, node.number)
            try:
                answer, arrived = await self.post(op, data, node)
            except Refused as e:
                if e.status == 401 and attempt == 1:
                    node.session = None
                    continue
                raise
            if node.index < APPLY_SAMPLE:
                opened = open_response(node.machine, node.control, answer, nonce)
            else:
                opened = node.open(answer, nonce)
            return opened, len(answer), arrived
        raise AssertionError("unreachable")

    def apply_deferred(self) -> None:
        for node, delta in self.deferred:
            if node.netmap is not None:
                node.netmap = patched(node.netmap, delta)
                self.applied += 1
        self.deferred.clear()

    def saw(self, node: SimNode, answer: dict[str, Any], size: int, arrived: float) -> None:
        if node.index < APPLY_SAMPLE:
            if "full" in answer:
                node.netmap = parse_netmap(answer["full"])
            elif "delta" in answer:
                # Patching a whole netmap is O(mesh) per node: on a real node that is
                # its own CPU's work, here 20 of them would stall the one simulator
                # loop that stamps every arrival. So it happens between changes.
                self.deferred.append((node, answer["delta"]))
        if self.expect is None or node.index in self.received:
            return
        entries: list[Any] = []
        if "delta" in answer:
            delta = answer["delta"]
            entries = [*delta.get("changed", []), delta.get("self")]
        elif "full" in answer:
            entries = [*answer["full"]["peers"], answer["full"]["self"]]
        for entry in entries:
            if (
                isinstance(entry, dict)
                and entry.get("public_key") == self.changer_pub
                and self.expect in entry.get("routes", ())
            ):
                self.received[node.index] = (arrived, size)
                return

    async def poll(self, node: SimNode) -> None:
        """The agent's long-poll loop, minus the kernel."""
        while not self.stop.is_set():
            node.polling = True
            try:
                answer, size, arrived = await self.call(node, "map", {"version": node.version})
            except (aiohttp.ClientError, Refused, BadResponse, TimeoutError) as e:
                self.errors.append(f"node {node.index}: {type(e).__name__}: {e}")
                await asyncio.sleep(0.5)
                continue
            finally:
                node.polling = False
            self.polls += 1
            node.version = answer["version"]
            self.saw(node, answer, size, arrived)


async def bounded(items: list[SimNode], limit: int, label: str, fn: Any) -> float:
    """Run fn(node) for every node, `limit` at a time, with a progress line; seconds taken."""
    sem = asyncio.Semaphore(limit)
    done = 0
    step = max(1, len(items) // 5)
    start = time.monotonic()

    async def one(node: SimNode) -> None:
        nonlocal done
        async with sem:
            await fn(node)
        done += 1
        if done % step == 0 or done == len(items):
            print(f"  {label}: {done}/{len(items)} ({time.monotonic() - start:.1f} s)", flush=True)

    await asyncio.gather(*(one(n) for n in items))
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(state: Path, port: int) -> subprocess.Popen[bytes]:
    log = (state / "server.log").open("wb")
    return subprocess.Popen(
        [
            str(ROOT / ".venv/bin/meshpi-control"),
            "--state-dir",
            str(state),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-listen",
            "127.0.0.1:0",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=raise_nofile,
        start_new_session=True,
    )


async def wait_up(url: str, proc: subprocess.Popen[bytes], state: Path) -> str:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited {proc.returncode}: {(state / 'server.log').read_text()[-2000:]}"
                )
            try:
                async with http.get(url + "/") as resp:
                    if resp.status == 200 and (state / "admin.url").exists():
                        return (state / "admin.token").read_text().strip()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not come up in 30 s")

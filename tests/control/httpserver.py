"""meshpi-control's two listeners (node API, loopback admin API) on loopback ports,
in a thread with its own event loop, for tests over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from appliance.agent.control.client import ControlClient
from appliance.control.app import create_admin_app, create_app
from appliance.control.cli import admin_call
from appliance.control.keys import load_admin_token, load_control_key
from appliance.control.service import ControlService
from appliance.control.store import open_store
from appliance.wire.seal import ControlPublicKey, MachineKey


@dataclass
class Server:
    url: str  # the public listener: the node API
    control_pub: ControlPublicKey
    token: str
    service: ControlService
    admin_url: str  # the loopback listener: admin API and /metrics

    def client(self, machine: MachineKey | None = None) -> ControlClient:
        return ControlClient(self.url, machine or MachineKey.generate(), self.control_pub, timeout=10)

    def admin(self, method: str, path: str, body: object = None) -> object:
        return admin_call(self.admin_url, self.token, method, path, body)

    def post(self, path: str, data: bytes) -> int:
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return e.code


@contextlib.contextmanager
def running_server(tmp_path: Path, db: str | Path | None = None, **service_options: Any) -> Iterator[Server]:
    """meshpi-control's two listeners on loopback ports, in a thread with its own loop."""
    key, token = load_control_key(tmp_path), load_admin_token(tmp_path)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}
    url = db or tmp_path / "control.db"
    options = {"map_timeout": 1, "batch": 0.02, **service_options}

    async def start() -> list[web.AppRunner]:
        service = ControlService(lambda: open_store(url), **options)
        box["service"] = service
        public = create_app(service, key)
        runners = [web.AppRunner(public, shutdown_timeout=1),
                   web.AppRunner(create_admin_app(service, token, public), shutdown_timeout=1)]  # fmt: skip
        for runner in runners:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        box["ports"] = [r.addresses[0][1] for r in runners]
        return runners

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["runners"] = loop.run_until_complete(start())
        finally:
            started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30) and "runners" in box, "the server did not start"
    pub = ControlPublicKey(bytes(key.public_key))
    public, admin = box["ports"]
    try:
        yield Server(f"http://127.0.0.1:{public}", pub, token, box["service"], f"http://127.0.0.1:{admin}")
    finally:
        for runner in reversed(box["runners"]):
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

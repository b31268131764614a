"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright,
against meshpi-web (waitress) talking to a real agent on the lab's pi.

    inet     meshpi-control 203.0.113.10:8443 (the mesh's control, a VPS)
    pi       meshpi agent, LocalAPI <scratch>/pi/local.sock, home LAN 192.168.77.0/24
    host     meshpi-web serve --listen 127.0.0.1:<port>   <- Chromium, also in the host's namespace
    laptop   no meshpi: the phone, a stock WireGuard client loading the page's QR (tests.lab.phone),
             dialling the home router's port forward 198.51.100.1:51820 -> the pi

The web process reaches the agent through its socket in the file system, which
crosses network namespaces. Playwright never downloads a browser: it launches
/usr/bin/chromium (scripts/setup installs it).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zxingcpp
from PIL import Image

from appliance.client.localapi import LocalAPIError, LocalClient
from tests.lab.host import REPO_ROOT, Host, wait_for
from tests.lab.topology import SERVER_V4, Lab

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
BIN = REPO_ROOT / ".venv" / "bin"
CONTROL = f"http://{SERVER_V4}:8443"
LOCAL_CONTROL = "127.0.0.1:18080"  # control on the pi itself, for "Create a new mesh"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the lab's network namespaces"
    if not CHROMIUM.exists():
        return f"needs {CHROMIUM} (Debian's chromium package; ./scripts/setup installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright Python package (pip install -e '.[test]')"
    absent = [t for t in ("ip", "nft", "wireguard-go", "wg") if shutil.which(t) is None]
    return f"needs {', '.join(absent)} on PATH" if absent else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = missing()
    for item in items:
        if "tests/browser/" in str(item.fspath).replace(os.sep, "/") and reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Home:
    lab: Lab
    agent: LocalClient
    url: str  # the dashboard
    login: str  # the mesh's login URL
    control_state: Path
    web_state: Path
    # name -> (where it runs, its command, the running process): for stop() and start()
    procs: dict[str, tuple[Host, list[str], subprocess.Popen[bytes]]] = field(default_factory=dict)

    def stop(self, name: str) -> None:
        """Stop the pi's agent or the mesh's control (as a crash or an outage would)."""
        self.lab.stop_process(self.procs[name][2])

    def start(self, name: str) -> None:
        where, cmd, _ = self.procs[name]
        log = self.lab.scratch / f"{name}.log"
        self.procs[name] = (where, cmd, where.popen(cmd, log=log))
        if name == "agent":
            wait_for(lambda: _answers(self.agent), 15, "the pi's LocalAPI again")

    def setup_code(self) -> str:
        """What the owner reads off the Pi's console (meshpi-web made it at its start)."""
        from webui.setupcode import SetupCode

        code = SetupCode(self.web_state / "setup-code").read()
        assert code, f"no setup code in {self.web_state}"
        return code

    def auth_key(self) -> str:
        cmd = [str(BIN / "meshpi-control"), "--state-dir", str(self.control_state), "keys", "create",
               "--expires", "600"]  # fmt: skip
        return self.lab.internet.run(cmd).stdout.strip()

    def status(self) -> dict[str, Any]:
        st = self.agent.get("/v1/status")
        assert isinstance(st, dict)
        return st


def _answers(client: LocalClient) -> bool:
    try:
        client.get("/v1/status")
    except LocalAPIError:
        return False
    return True


@contextlib.contextmanager
def lab_home(local_control: bool = False) -> Iterator[Home]:
    """The lab with meshpi-web in front of the pi's agent. The mesh's control runs on
    `inet` (a VPS), or, with `local_control`, on the pi itself (loopback), where the
    dashboard's "Create a new mesh" starts using it."""
    from nacl.public import PrivateKey

    from appliance.wire.loginurl import login_url

    with Lab() as lab:
        control_state = lab.scratch / "control"
        where, listen = (lab.pi, LOCAL_CONTROL) if local_control else (lab.internet, f"{SERVER_V4}:8443")
        control_cmd = [
            str(BIN / "meshpi-control"),
            "--state-dir",
            str(control_state),
            "serve",
            "--listen",
            listen,
        ]
        control = where.popen(control_cmd, log=lab.scratch / "control.log")
        wait_for(lambda: (control_state / "control.key").exists(), 10, "control")
        key = base64.b64decode((control_state / "control.key").read_text().strip())
        login = login_url(f"http://{listen}" if local_control else CONTROL, PrivateKey(key).public_key)
        sock = lab.scratch / "pi" / "local.sock"
        sock.parent.mkdir()
        agent_cmd = [str(BIN / "meshpi"), "agent", "--state-dir", str(lab.scratch / "pi" / "agent"),
                     "--local-api", str(sock), "--control-start", ""]  # fmt: skip
        if local_control:
            agent_cmd += ["--control-state-dir", str(control_state), "--control-url", f"http://{listen}"]
        agent_proc = lab.pi.popen(agent_cmd, log=lab.scratch / "pi-agent.log")
        agent = LocalClient(sock)
        wait_for(lambda: _answers(agent), 15, "the pi's LocalAPI")
        agent.patch("/v1/prefs", {"interface": f"mpb{os.getpid() % 100000}", "backend": "userspace",
                                  "hostname": "pi"})  # fmt: skip
        port = free_port()
        with open(lab.scratch / "web.log", "ab") as out:
            web = subprocess.Popen(
                [str(BIN / "meshpi-web"), "serve", "--listen", f"127.0.0.1:{port}", "--socket", str(sock),
                 "--state-dir", str(lab.scratch / "web")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        lab.procs.append(web)
        wait_for(lambda: _port_open(port), 15, "meshpi-web")
        home = Home(
            lab,
            agent,
            f"http://127.0.0.1:{port}",
            login,
            control_state,
            lab.scratch / "web",
            procs={"control": (where, control_cmd, control), "agent": (lab.pi, agent_cmd, agent_proc)},
        )
        try:
            yield home
        finally:
            lab.pi.run(
                [str(BIN / "meshpi"), "down", "--state-dir", str(lab.scratch / "pi" / "agent")], check=False
            )
            if sys.exc_info()[0] is not None:
                print((lab.scratch / "web.log").read_text()[-3000:])


@pytest.fixture(scope="module")
def home() -> Iterator[Home]:
    with lab_home() as h:
        yield h


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Tab:
    page: Any
    errors: list[str]


@pytest.fixture(scope="module")
def tab(browser: Any, home: Home) -> Iterator[Tab]:
    """One browser tab for the module's flow (its cookies carry the session on)."""
    context = browser.new_context(base_url=home.url, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    # Nothing may leave this device: every request goes to the dashboard itself.
    page.on("request", lambda r: errors.append(f"external request: {r.url}")
            if not r.url.startswith((home.url, "data:")) else None)  # fmt: skip
    yield Tab(page, errors)
    context.close()


def qr_text(png: bytes) -> str:
    """What the QR code in a screenshot says (zxing-cpp, as a phone's camera would read it)."""
    found = zxingcpp.read_barcode(Image.open(io.BytesIO(png)))
    assert found is not None and found.format == zxingcpp.BarcodeFormat.QRCode, found
    return found.text

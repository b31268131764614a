"""The real client against a real (tiny) sealed HTTP server on 127.0.0.1.

The server is what control/app.py does, on http.server: open_request, the
session table, seal_response; ops `hello`, `echo` and a few misbehaving ones.
"""

from __future__ import annotations

import http.client
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.agent.control.client import (
    ControlBadResponse,
    ControlClient,
    ControlKeyChanged,
    ControlPinError,
    ControlRefused,
    ControlUnreachable,
    pin_control_key,
)
from appliance.agent.statedir import StateDir, StateDirError
from appliance.control.sessions import SessionError, Sessions
from appliance.wire.seal import (
    MAX_BODY,
    ControlKey,
    MachineKey,
    SealError,
    open_request,
    seal_response,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Control:
    """A sealed server in a thread. Sessions is not thread-safe: one lock around it."""

    def __init__(self) -> None:
        self.key = ControlKey.generate()
        self.clock = FakeClock()
        self.sessions = Sessions(self.clock)
        self.lock = threading.Lock()
        self.hellos = 0
        self.bodies: dict[str, bytes] = {}  # the last raw body posted to each op
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: keep teardown quick.
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def client(self, **kw: Any) -> ControlClient:
        return ControlClient(self.url, kw.pop("machine", MACHINE), self.key.public_key(), **kw)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.httpd.server_address[1], timeout=5)
        try:
            conn.request("POST", path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def answer(self, op: str, body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.bodies[op] = body
        try:
            opened = open_request(self.key, body, op)
        except SealError as e:
            return e.status, e.message.encode()
        with self.lock:
            try:
                if op == "hello":
                    self.hellos += 1
                    return 200, opened.reply({"session": self.sessions.hello(opened.machine)})
                self.sessions.check(opened.plaintext.get("session"), opened.machine, opened.nonce)
            except SessionError as e:
                return e.status, e.message.encode()
        if op == "echo":
            return 200, opened.reply(opened.plaintext["body"])
        if op == "wait":
            self.release.wait()
            return 200, opened.reply({})
        if op == "wrong_re":
            return 200, seal_response(opened.box, bytes(24), {})  # the answer to no request
        if op == "always401":
            return 401, b"session unknown or expired: say hello again"
        if op == "boom":
            return 500, b"internal error\x1b[31m\nsecond line"
        return 404, f"no op {op!r}".encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        control = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                status, data = control.answer(self.path.removeprefix("/v1/"), self.rfile.read(length))
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


MACHINE = MachineKey.generate()


@pytest.fixture
def control() -> Iterator[Control]:
    server = Control()
    server.thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join()


def test_transport_hello_then_echo(control: Control) -> None:
    client = control.client()
    assert client.call("echo", {"x": [1, "ü", None]}) == {"x": [1, "ü", None]}
    assert client.call("echo", {}) == {}
    assert control.hellos == 1


def test_transport_session_expiry_says_hello_again(control: Control) -> None:
    client = control.client()
    client.call("echo", {"n": 1})
    control.clock.now += 3600
    assert client.call("echo", {"n": 2}) == {"n": 2}
    assert control.hellos == 2


def test_transport_server_restart_says_hello_again(control: Control) -> None:
    client = control.client()
    client.call("echo", {})
    with control.lock:
        control.sessions = Sessions(control.clock)  # a restarted server knows no session
    assert client.call("echo", {"back": True}) == {"back": True}
    assert control.hellos == 2


def test_transport_hello_again_only_once_per_call(control: Control) -> None:
    with pytest.raises(ControlRefused) as e:
        control.client().call("always401", {})
    assert e.value.status == 401
    assert control.hellos == 2


def test_transport_replayed_request_is_409(control: Control) -> None:
    control.client().call("echo", {"pay": 1})
    status, text = control.post("/v1/echo", control.bodies["echo"])
    assert status == 409 and b"already seen" in text


def test_transport_request_posted_to_another_op_is_400(control: Control) -> None:
    control.client().call("echo", {})
    status, text = control.post("/v1/logout", control.bodies["echo"])
    assert status == 400 and b"sealed for op 'echo'" in text


def test_transport_wrong_control_key_is_400(control: Control) -> None:
    client = ControlClient(control.url, MACHINE, ControlKey.generate().public_key())
    with pytest.raises(ControlRefused) as e:
        client.call("echo", {})
    assert e.value.status == 400 and "does not open" in e.value.message


@pytest.mark.parametrize(
    ("mangle", "status"),
    [
        (lambda b: b"", 400),
        (lambda b: b[:50], 400),
        (lambda b: b[:-1], 400),
        (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], 400),
        (lambda b: b"\x02" + b[1:], 400),
        (lambda b: b + bytes(MAX_BODY), 413),
    ],
    ids=["empty", "truncated", "short-by-one", "flipped", "version", "oversized"],
)
def test_transport_garbled_bodies_are_4xx(control: Control, mangle: Any, status: int) -> None:
    control.client().call("echo", {})
    got, _ = control.post("/v1/echo", mangle(control.bodies["echo"]))
    assert got == status


def test_transport_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = ControlClient(f"http://127.0.0.1:{port}", MACHINE, ControlKey.generate().public_key())
        with pytest.raises(ControlUnreachable, match="ConnectionRefusedError"):
            client.call("echo", {})


def test_transport_timeout_is_unreachable(control: Control) -> None:
    client = control.client()
    client.call("echo", {})
    with pytest.raises(ControlUnreachable, match="timed out"):
        client.call("wait", {}, timeout=0.2)


def test_transport_answer_to_another_request_is_rejected(control: Control) -> None:
    with pytest.raises(ControlBadResponse, match="another request"):
        control.client().call("wrong_re", {})


def test_transport_server_error_is_refused_with_safe_text(control: Control) -> None:
    with pytest.raises(ControlRefused) as e:
        control.client().call("boom", {})
    assert e.value.status == 500
    assert e.value.message == "internal error [31m second line"


def test_transport_threads_share_one_session(control: Control) -> None:
    client = control.client()
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(client.call("echo", {"i": i}))) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["i"] for r in results) == list(range(8))
    assert control.hellos == 1


# -- pinning and the machine key


def test_transport_pin_first_use_then_same_key(tmp_path: Path) -> None:
    key = ControlKey.generate().public_key()
    pin_control_key(tmp_path / "control.json", "http://a:1", key)
    pin_control_key(tmp_path / "control.json", "http://b:2", key)  # the server moved: fine
    doc = json.loads((tmp_path / "control.json").read_text())
    assert doc == {"server": "http://b:2", "control_key": str(key)}


def test_transport_pin_refuses_another_key_naming_both(tmp_path: Path) -> None:
    old, new = ControlKey.generate().public_key(), ControlKey.generate().public_key()
    pin_control_key(tmp_path / "control.json", "http://a:1", old)
    with pytest.raises(ControlKeyChanged) as e:
        pin_control_key(tmp_path / "control.json", "http://a:1", new)
    for part in (str(old), str(new), str(tmp_path / "control.json")):
        assert part in str(e.value)


def test_transport_pin_refuses_a_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "control.json").write_text("{garbage")
    with pytest.raises(ControlPinError, match="not a control key pin"):
        pin_control_key(tmp_path / "control.json", "http://a:1", ControlKey.generate().public_key())


def test_transport_machine_key_made_once_0600(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    key = state.machine_key()
    assert stat.S_IMODE(state.machine_key_file.stat().st_mode) == 0o600
    assert state.machine_key() == key
    state.machine_key_file.chmod(0o644)
    assert state.machine_key() == key
    assert stat.S_IMODE(state.machine_key_file.stat().st_mode) == 0o600


def test_transport_corrupt_machine_key_is_refused_without_quoting_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.machine_key_file.write_text("c2VjcmV0LXNlY3JldA\n")
    with pytest.raises(StateDirError) as e:
        state.machine_key()
    assert "c2VjcmV0" not in str(e.value) and "machine.key" in str(e.value)


def test_transport_abort_polls_ends_a_long_poll_at_once_and_nothing_else() -> None:
    """After this host's address changed, the long-poll in flight is ended (the link
    polls again on a new connection); another op in flight is left alone."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)  # accepts, never answers: a poll on a connection nobody answers any more
        client = ControlClient(f"http://127.0.0.1:{server.getsockname()[1]}", MACHINE,
                               ControlKey.generate().public_key())  # fmt: skip
        outcome: dict[str, BaseException | None] = {}

        def ask(op: str) -> None:
            try:
                client._post(op, {"op": op}, 1, 30)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                outcome[op] = e

        threads = {op: threading.Thread(target=ask, args=(op,), daemon=True) for op in ("map", "update")}
        for thread in threads.values():
            thread.start()
        conns = [server.accept()[0] for _ in threads]  # both requests are in flight
        try:
            deadline = time.monotonic() + 5
            while client.abort_polls() == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            threads["map"].join(2)
            assert not threads["map"].is_alive(), "the long-poll was not ended"
            assert isinstance(outcome["map"], ControlUnreachable)
            threads["update"].join(0.3)
            assert threads["update"].is_alive() and "update" not in outcome  # still waiting for its answer
        finally:
            for conn in conns:
                conn.close()

"""`meshpi-web` as a program: `passwd` from a pipe (first boot) and `serve` under
waitress, as an unprivileged user, on --listen or on a socket systemd passes."""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import unprivileged
from tests.web.conftest import csrf_of
from tests.web.node import BIN, AgentNode
from webui.passwords import PasswordFile
from webui.setupcode import SetupCode

NOBODY = 65534


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_web_passwd_reads_the_password_from_a_pipe(tmp_path: Path) -> None:
    state = tmp_path / "web"
    # As first boot runs it: printf %s "$pw" | meshpi-web passwd
    done = subprocess.run([str(BIN / "meshpi-web"), "passwd", "--state-dir", str(state)],
                          input="from the boot partition", capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert PasswordFile(state).check("from the boot partition")
    assert "from the boot partition" not in done.stdout + done.stderr
    # One trailing newline (echo) is not part of the password.
    subprocess.run([str(BIN / "meshpi-web"), "passwd", "--state-dir", str(state)], input="with echo\n",
                   capture_output=True, text=True, check=True)  # fmt: skip
    assert PasswordFile(state).check("with echo")
    short = subprocess.run([str(BIN / "meshpi-web"), "passwd", "--state-dir", str(state)], input="short",
                           capture_output=True, text=True)  # fmt: skip
    assert short.returncode == 2
    assert short.stderr.strip() == "meshpi-web: the password must have at least 8 characters"
    assert PasswordFile(state).check("with echo")  # unchanged


def test_web_passwd_resets_from_a_file_on_the_boot_partition_and_deletes_it(tmp_path: Path) -> None:
    state, boot = tmp_path / "web", tmp_path / "firmware"
    boot.mkdir()
    PasswordFile(state).set("forgotten one")
    reset = boot / "meshpi-password.txt"
    reset.write_bytes(b"\xef\xbb\xbfnew password 1\r\nignored second line\r\n")  # as Notepad writes it
    done = subprocess.run([str(BIN / "meshpi-web"), "passwd", "--state-dir", str(state), "--from-file", str(reset)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert PasswordFile(state).check("new password 1") and not PasswordFile(state).check("forgotten one")
    assert not reset.exists() and "new password 1" not in done.stdout + done.stderr
    reset.write_text("short\n")  # refused: the file stays, the password too
    bad = subprocess.run([str(BIN / "meshpi-web"), "passwd", "--state-dir", str(state), "--from-file", str(reset)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "at least 8 characters" in bad.stderr
    assert reset.exists() and PasswordFile(state).check("new password 1")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=5) as r:  # noqa: S310 - loopback
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"meshpi-web exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''!r}"
            )
        try:
            _get(url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def _running(cmd: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary directory others may enter (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="meshpi-web-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_web_serve_runs_as_an_unprivileged_user(node: AgentNode, public_tmp: Path) -> None:
    """From any clone (a 0700 home directory too): nobody runs a readable copy
    (tests/unprivileged.py), never the checkout's own .venv."""
    state = public_tmp / "web"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    port = _free_port()
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
           str(unprivileged.python()), "-m", "webui.server", "serve", "--listen", f"127.0.0.1:{port}",
           "--state-dir", str(state), "--socket", str(node.socket)]  # fmt: skip
    with _running(cmd, cwd="/") as proc:
        _wait_http(f"http://127.0.0.1:{port}/login", proc)
        assert _uids(proc.pid) == [NOBODY] * 4
        # It made its own files, as itself, private.
        assert (state / "secret_key").stat().st_uid == NOBODY
        assert oct((state / "secret_key").stat().st_mode & 0o777) == "0o600"
        # A browser's first visit: set the password, then ask for the agent's status.
        # The agent's socket is 0660 root:<its group>; here that group is nogroup.
        os.chown(node.socket, 0, NOBODY)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        base = f"http://127.0.0.1:{port}"
        token = csrf_of(opener.open(f"{base}/setup", timeout=5).read().decode())
        # The web service made the setup code itself (no root made one), private to it.
        assert (state / "setup-code").stat().st_uid == NOBODY
        assert (state / "setup-code").stat().st_mode & 0o007 == 0
        code = SetupCode(state / "setup-code").read()
        assert code
        form = urllib.parse.urlencode({"csrf_token": token, "setup_code": code, "password": "a fine password",
                                       "confirm": "a fine password"})  # fmt: skip
        opener.open(f"{base}/setup", data=form.encode(), timeout=30)
        assert (state / "password").stat().st_uid == NOBODY
        assert not (state / "setup-code").exists()  # used once
        status = json.loads(opener.open(f"{base}/api/status", timeout=10).read())
        assert status["agent"] == "running"


def test_web_serve_takes_the_socket_systemd_passes(node: AgentNode, tmp_path: Path) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("needs systemd-socket-activate (systemd)")
    port, unused = _free_port(), _free_port()
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", str(BIN / "meshpi-web"), "serve",
           "--listen", f"127.0.0.1:{unused}", "--state-dir", str(tmp_path / "web"), "--socket", str(node.socket)]  # fmt: skip
    with _running(cmd) as proc:
        # systemd-socket-activate listens first and starts meshpi-web at the first connection.
        _wait_http(f"http://127.0.0.1:{port}/login", proc)
        status, body = _get(f"http://127.0.0.1:{port}/setup")
        assert status == 200 and "Choose the admin password" in body
        assert proc.poll() is None
        with pytest.raises(ConnectionRefusedError):  # --listen is for when systemd passes nothing
            socket.create_connection(("127.0.0.1", unused), timeout=2).close()

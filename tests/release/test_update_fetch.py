"""`meshpi-update check`: the bundle at the update URL, fetched from a real HTTP server
on loopback. A newer one is recorded as available (and applied, which
test_update_apply covers); the same or an older one is nothing new; hostile answers
(a wrong signature, oversized with or without a Content-Length, truncated, 404, no
server) are refused with the reason recorded and nothing left behind."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.update.bundle import BundleError, Version, write_bundle
from appliance.update.fetch import download
from appliance.update.main import main
from tests.release.installed import installed_layout

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(120, 152)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(160, 192)))


def make_bundle(tmp: Path, version: str, key: Ed25519PrivateKey = KEY) -> bytes:
    wheel = tmp / f"meshpi-{version}-py3-none-any.whl"
    wheel.write_bytes(bytes(i % 253 for i in range(30_000)))
    out = tmp / f"b-{version}-{id(key)}.bundle"
    write_bundle(out, [wheel], Version.parse(version), "cp313", "aarch64", "2026-12-03T00:00:00Z", key)
    return out.read_bytes()


class Server:
    """Loopback HTTP: path -> (body, Content-Length to claim or None)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path not in routes:
                    self.send_error(404, "no such bundle")
                    return
                body, length = routes[self.path]
                self.send_response(200)
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture
def rig(tmp_path: Path) -> dict[str, Path]:
    return installed_layout(tmp_path, KEY) | {"available": tmp_path / "state/available.json"}


def run_check(
    rig: dict[str, Path], url: str, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, dict]:  # type: ignore[type-arg]
    rc = main(["--versions", str(rig["versions"]), "--current", str(rig["current"]), "--keys", str(rig["keys"]),
               "--local-api", "/nonexistent.sock", "check", "--url", url, "--available", str(rig["available"]),
               *extra])  # fmt: skip
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_update_check_newer_bundle_is_recorded_as_available(
    tmp_path: Path, server: Server, rig: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/meshpi.bundle"] = (make_bundle(tmp_path, "0.3.0"), None)
    rc, out = run_check(rig, f"{server.url}/meshpi.bundle", capsys, "--no-apply")
    assert rc == 0 and out["result"] == "available" and out["version"] == "0.3.0", out
    found = json.loads(rig["available"].read_text())
    assert found["version"] == "0.3.0" and found["error"] is None and found["url"].endswith("/meshpi.bundle")
    assert (rig["available"].parent / "download.bundle").exists()


@pytest.mark.parametrize("version", ["0.2.0", "0.1.9"])
def test_update_check_same_or_older_is_nothing_new(
    tmp_path: Path, server: Server, rig: dict[str, Path], capsys: pytest.CaptureFixture[str], version: str
) -> None:
    server.routes["/b"] = (make_bundle(tmp_path, version), None)
    rc, out = run_check(rig, f"{server.url}/b", capsys)
    assert rc == 0 and out["result"] == "up to date", out
    assert json.loads(rig["available"].read_text())["version"] is None
    assert sorted(p.name for p in rig["available"].parent.iterdir()) == ["available.json"]


def test_update_check_a_version_rolled_back_before_is_not_retried(
    tmp_path: Path, server: Server, rig: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (rig["versions"] / "last-update.json").write_text(
        json.dumps({"result": "rolled back", "version": "0.3.0"})
    )
    server.routes["/b"] = (make_bundle(tmp_path, "0.3.0"), None)
    rc, out = run_check(rig, f"{server.url}/b", capsys)  # no --no-apply: it would apply if it were new
    assert rc == 0 and out["result"] == "available", out
    assert sorted(p.name for p in rig["versions"].iterdir()) == ["0.2.0", "last-update.json"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong signature", "the signature does not match any trusted update key"),
        ("truncated", "bytes (truncated)"),
        ("not found", "the server answered 404"),
        ("no server", "cannot download"),
        ("garbage", "not a readable bundle"),
    ],
)
def test_update_check_hostile_answers_are_refused_and_recorded(
    tmp_path: Path, server: Server, rig: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str,
    message: str,
) -> None:  # fmt: skip
    good = make_bundle(tmp_path, "0.3.0")
    url = f"{server.url}/b"
    if case == "wrong signature":
        server.routes["/b"] = (make_bundle(tmp_path, "0.3.0", OTHER), None)
    elif case == "truncated":
        server.routes["/b"] = (good[: len(good) // 2], len(good))  # says all, sends half, closes
    elif case == "garbage":
        server.routes["/b"] = (b"<html>not a bundle</html>" * 100, None)
    elif case == "no server":
        url = "http://127.0.0.1:9/b"  # discard: nothing listens
    rc, out = run_check(rig, url, capsys)
    assert rc == 1 and out["result"] == "refused" and message in str(out["error"]), out
    found = json.loads(rig["available"].read_text())
    assert found["version"] is None and message in found["error"]
    assert sorted(p.name for p in rig["available"].parent.iterdir()) == ["available.json"]
    assert sorted(p.name for p in rig["versions"].iterdir()) == ["0.2.0"]


@pytest.mark.parametrize("claims", [True, False])
def test_update_download_oversized_is_refused(tmp_path: Path, server: Server, claims: bool) -> None:
    body = b"x" * 300_000
    server.routes["/big"] = (body, len(body) if claims else None)
    dest = tmp_path / "d.bundle"
    with pytest.raises(BundleError, match="more than a bundle may be"):
        download(f"{server.url}/big", dest, limit=100_000)
    assert not dest.exists()


def test_update_check_without_url_is_off(rig: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rig["available"].parent.mkdir()
    rig["available"].write_text("{}")
    rc, out = run_check(rig, "", capsys)
    assert rc == 0 and out["result"] == "off" and not rig["available"].exists()

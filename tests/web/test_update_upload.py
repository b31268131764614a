"""Uploading an update bundle on the dashboard: a good one is checked and left in the
spool for root's unit; hostile ones (truncated, oversized, garbage, a wrong signature,
a tampered wheel, a replayed older or the same version, no CSRF, no login) are refused
with a clear message and leave nothing behind. The agent is real (a network
namespace); the installed version is a fake venv's metadata."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flask import Flask
from flask.testing import FlaskClient

import webui.update
from appliance.update.bundle import Version, write_bundle
from tests.release.installed import installed_layout
from tests.web.conftest import make_app, set_password_and_log_in
from tests.web.node import AgentNode

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(40, 72)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(80, 112)))


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    return installed_layout(tmp_path, KEY) | {"spool": tmp_path / "spool"}


@pytest.fixture
def app(node: AgentNode, tmp_path: Path, paths: dict[str, Path]) -> Flask:
    return make_app(node.socket, tmp_path / "web", UPDATE_KEYS=str(paths["keys"]),
                    UPDATE_VERSIONS=str(paths["versions"]), UPDATE_CURRENT=str(paths["current"]),
                    UPDATE_SPOOL=str(paths["spool"]))  # fmt: skip


@pytest.fixture
def token(client: FlaskClient) -> str:
    return set_password_and_log_in(client)


def bundle(tmp: Path, version: str, key: Ed25519PrivateKey = KEY, wheel_size: int = 4096) -> bytes:
    wheel = tmp / f"meshpi-{version}-py3-none-any.whl"
    wheel.write_bytes(bytes(i % 251 for i in range(wheel_size)))
    out = tmp / f"meshpi-{version}.bundle"
    write_bundle(out, [wheel], Version.parse(version), "cp313", "aarch64", "2026-12-03T00:00:00Z", key)
    return out.read_bytes()


def upload(client: FlaskClient, token: str | None, data: bytes) -> tuple[int, str]:
    form: dict[str, object] = {"bundle": (io.BytesIO(data), "meshpi.bundle")}
    if token is not None:
        form["csrf_token"] = token
    res = client.post("/update", data=form, content_type="multipart/form-data", follow_redirects=True)
    return res.status_code, res.get_data(as_text=True)


def left_in(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


def flashed(html: str) -> str:
    found = re.findall(r'<div class="banner (?:ok|error)" role="status">(.*?)</div>', html, re.S)
    return " ".join(found)


def test_web_update_upload_good_bundle_is_checked_and_handed_to_root(
    client: FlaskClient, token: str, tmp_path: Path, paths: dict[str, Path]
) -> None:
    data = bundle(tmp_path, "0.3.0")
    status, html = upload(client, token, data)
    assert status == 200
    assert "meshpi 0.3.0: signature and 1 wheels checked. Installing now" in flashed(html)
    assert left_in(paths["spool"]) == ["upload.bundle"]
    assert (paths["spool"] / "upload.bundle").read_bytes() == data
    # A second upload while one waits is refused; the first stays as it was.
    status, html = upload(client, token, bundle(tmp_path, "0.4.0"))
    assert "An update is already waiting" in flashed(html)
    assert (paths["spool"] / "upload.bundle").read_bytes() == data
    assert 'id="update-waiting"' in html


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "is truncated"),
        ("garbage", "not a readable bundle"),
        ("wrong signature", "the signature does not match any trusted update key"),
        ("tampered wheel", "does not match its SHA-256 in the signed manifest (tampered?)"),
        ("replayed older", "version 0.1.0 is older than the installed 0.2.0 (a replayed release?)"),
        ("same version", "version 0.2.0 is the installed version"),
        ("empty", "Choose a bundle file"),
    ],
)
def test_web_update_upload_hostile_bundle_refused_nothing_changed(
    client: FlaskClient, token: str, tmp_path: Path, paths: dict[str, Path], case: str, message: str
) -> None:
    good = bundle(tmp_path, "0.3.0", wheel_size=64 * 1024)
    data = {
        "truncated": good[: len(good) - 20 * 1024],
        "garbage": bytes(range(256)) * 100,
        "wrong signature": bundle(tmp_path, "0.3.0", OTHER),
        "tampered wheel": good[:5000] + bytes([good[5000] ^ 1]) + good[5001:],
        "replayed older": bundle(tmp_path, "0.1.0"),
        "same version": bundle(tmp_path, "0.2.0"),
        "empty": b"",
    }[case]
    if case == "tampered wheel":  # the flipped byte is inside the wheel, past the manifest and signature
        assert good.index(b"wheels/meshpi-0.3.0") < 5000 - 512
    if case == "empty":
        res = client.post("/update", data={"csrf_token": token}, follow_redirects=True)
        status, html = res.status_code, res.get_data(as_text=True)
    else:
        status, html = upload(client, token, data)
    assert status == 200
    said = flashed(html)
    assert message in said, said
    if case != "empty":
        assert said.startswith("Update refused: ") and said.endswith("Nothing was changed."), said
    assert [n for n in left_in(paths["spool"]) if not n.startswith(".")] == []
    assert left_in(paths["spool"]) == []


def test_web_update_upload_oversized_refused_before_it_is_read(
    client: FlaskClient, token: str, tmp_path: Path, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webui.update, "MAX_UPLOAD", 100 * 1024)  # the real limit is 257 MB
    status, html = upload(client, token, bundle(tmp_path, "0.3.0", wheel_size=200 * 1024))
    assert status == 413
    assert "Update refused: a bundle is at most" in html and "Nothing was changed." in html
    assert left_in(paths["spool"]) == []


def test_web_update_upload_needs_csrf_and_login(
    app: Flask, client: FlaskClient, token: str, tmp_path: Path, paths: dict[str, Path]
) -> None:
    data = bundle(tmp_path, "0.3.0")
    status, html = upload(client, None, data)
    assert status == 403 and "expired or came from another site" in html
    stranger = app.test_client()
    res = stranger.post("/update", data={"bundle": (io.BytesIO(data), "x.bundle"), "csrf_token": token},
                        content_type="multipart/form-data")  # fmt: skip
    assert res.status_code == 302 and "/login" in res.headers["Location"]
    assert left_in(paths["spool"]) == []


def test_web_update_page_shows_version_and_last_result(client: FlaskClient, token: str) -> None:
    html = client.get("/update").get_data(as_text=True)
    assert 'id="update-current"' in html and 'id="update-form"' in html
    assert 'enctype="multipart/form-data"' in html


def test_web_update_url_is_saved_in_prefs_and_checked_by_the_agent(client: FlaskClient, token: str) -> None:
    res = client.post("/update/url", data={"csrf_token": token, "update_url": "https://example.net/latest.bundle"},
                      follow_redirects=True)  # fmt: skip
    assert "Update URL saved: https://example.net/latest.bundle" in flashed(res.get_data(as_text=True))
    assert 'value="https://example.net/latest.bundle"' in client.get("/update").get_data(as_text=True)
    res = client.post("/update/url", data={"csrf_token": token, "update_url": "file:///etc/shadow"},
                      follow_redirects=True)  # fmt: skip
    said = flashed(res.get_data(as_text=True))
    assert "update_url" in said and "http:// or https://" in said, said
    assert 'value="https://example.net/latest.bundle"' in client.get("/update").get_data(as_text=True)
    res = client.post("/update/url", data={"csrf_token": token, "update_url": ""}, follow_redirects=True)
    assert "Update URL cleared" in flashed(res.get_data(as_text=True))

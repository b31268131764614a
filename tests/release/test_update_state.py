"""The `update` slot of the agent's status, `meshpi status`'s line for it, and root's
taking of the dashboard's upload (links, devices and oversized files refused)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import appliance.update.spool as spool_mod
from appliance.agent.localapi.status import format_status, update_line
from appliance.update.bundle import BundleError
from appliance.update.spool import take_upload
from appliance.update.state import PROGRESS, RESULT, STALE, update_slot, write_progress


def test_update_slot_nothing_yet(tmp_path: Path) -> None:
    slot = update_slot("0.2.0", tmp_path / "versions", tmp_path / "available.json")
    assert slot == {"current": "0.2.0", "last": None, "installing": None, "available": None, "checked": None}


def test_update_slot_last_result_progress_and_available(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    result = {"result": "rolled back", "version": "0.3.0", "previous": "0.2.0",
              "reason": "the agent does not answer", "seconds": 48.2, "time": 1_800_000_000.0}  # fmt: skip
    (versions / RESULT).write_text(json.dumps(result))
    write_progress(versions, "0.4.0", "installing", time.time())
    available = tmp_path / "available.json"
    available.write_text(json.dumps({"version": "0.4.0", "url": "https://example.invalid/b", "checked": 1.0}))
    slot = update_slot("0.2.0", versions, available)
    assert slot["last"] == result
    assert slot["installing"]["version"] == "0.4.0" and slot["installing"]["step"] == "installing"
    assert slot["available"]["version"] == "0.4.0"
    line = update_line(slot)
    assert line.startswith("meshpi 0.2.0; installing 0.4.0 (installing); last update ")
    assert "rolled back 0.3.0 (the agent does not answer); 0.4.0 available" in line
    st = {"agent": "running", "version": "0.2.0", "control": {"state": "needs-login"}, "update": slot}
    assert "update: meshpi 0.2.0; installing 0.4.0" in format_status(st)


def test_update_slot_ignores_stale_progress_garbage_and_the_running_version(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    write_progress(versions, "0.4.0", "installing", time.time() - STALE - 60)  # a power cut's leftover
    (versions / RESULT).write_text("{not json")
    available = tmp_path / "available.json"
    available.write_text(json.dumps({"version": "0.2.0", "url": "http://x.invalid/b", "checked": 5.0}))
    assert (versions / PROGRESS).exists()
    slot = update_slot("0.2.0", versions, available)
    assert slot["last"] is None and slot["installing"] is None and slot["available"] is None
    assert slot["checked"] == {"url": "http://x.invalid/b", "checked": 5.0, "error": None}


def test_update_take_upload_copies_and_removes(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "upload.bundle").write_bytes(b"x" * 5000)
    dest = tmp_path / "root" / ".upload.bundle"
    dest.parent.mkdir()
    assert take_upload(spool, dest) == dest
    assert dest.read_bytes() == b"x" * 5000 and dest.stat().st_mode & 0o777 == 0o600
    assert not (spool / "upload.bundle").exists()
    assert take_upload(spool, dest) is None  # nothing waits
    assert take_upload(tmp_path / "absent", dest) is None


def test_update_take_upload_refuses_links_and_devices(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's")
    spool = tmp_path / "spool"
    spool.mkdir()
    dest = tmp_path / ".upload.bundle"
    (spool / "upload.bundle").symlink_to(secret)
    with pytest.raises(BundleError, match="not a regular file"):
        take_upload(spool, dest)
    assert not (spool / "upload.bundle").is_symlink() and not dest.exists() and secret.exists()
    os.mkfifo(spool / "upload.bundle")
    with pytest.raises(BundleError, match="not a regular file"):
        take_upload(spool, dest)
    assert not (spool / "upload.bundle").exists()
    linked = tmp_path / "linked-spool"
    linked.symlink_to(spool)  # the web user swapped its directory for a link
    (spool / "upload.bundle").write_bytes(b"x")
    with pytest.raises(BundleError, match="not a directory"):
        take_upload(linked, dest)
    assert (spool / "upload.bundle").exists() and not dest.exists()


def test_update_take_upload_refuses_oversized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "MAX_UPLOAD", 1000)
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "upload.bundle").write_bytes(b"x" * 1001)
    with pytest.raises(BundleError, match="the upload is 1001 bytes, more than a bundle may be"):
        take_upload(spool, tmp_path / ".upload.bundle")
    assert not (spool / "upload.bundle").exists() and not (tmp_path / ".upload.bundle").exists()

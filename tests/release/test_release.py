"""scripts/release end to end: real arm64 wheels from the mirror (scripts/wheels, as the
image gets them), signed, and checked the way an appliance checks a bundle."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from appliance.update.bundle import BundleError, Version, parse_public_key, verify_bundle

ROOT = Path(__file__).resolve().parents[2]
RELEASE = str(ROOT / "scripts/release")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RELEASE, *args], capture_output=True, text=True, timeout=600)


def test_release_bundle_is_signed_and_verifies_on_the_appliance(tmp_path: Path) -> None:
    made = run("--new-key", str(tmp_path / "k.pem"))
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    public = parse_public_key(made.stdout.strip(), "printed key")
    again = run("--new-key", str(tmp_path / "k.pem"))
    assert again.returncode == 2 and "not overwriting" in again.stderr

    done = run("--key", str(tmp_path / "k.pem"), "--version", "9.8.7", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "9.8.7" and result["wheels"] > 10
    with open(result["bundle"], "rb") as f:
        manifest = verify_bundle(f, (public,), tmp_path / "staging", Version(0, 1, 0))
    assert manifest.version == Version(9, 8, 7) and manifest.platform == "aarch64"
    (ours,) = (tmp_path / "staging").glob("meshpi-9.8.7-*.whl")
    with zipfile.ZipFile(ours) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        assert "Version: 9.8.7" in whl.read(meta).decode()
    assert any(p.name.startswith("pyroute2-") for p in (tmp_path / "staging").iterdir())
    with open(result["bundle"], "rb") as f, pytest.raises(BundleError, match="is the installed version"):
        verify_bundle(f, (public,), tmp_path / "staging2", Version(9, 8, 7))


def test_release_refuses_bad_arguments_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    bad_key = run("--key", str(tmp_path / "junk.pem"))
    assert bad_key.returncode != 0 and "not a readable unencrypted PEM key" in bad_key.stderr
    assert run("--new-key", str(tmp_path / "k.pem")).returncode == 0
    bad_version = run("--key", str(tmp_path / "k.pem"), "--version", "1.2")
    assert bad_version.returncode != 0 and "'1.2' is not a version like 1.2.3" in bad_version.stderr
    assert "required" in run().stderr

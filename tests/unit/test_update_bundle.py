"""Release bundles: a good one verifies and lands in staging; everything hostile is
refused with a message that says why, and leaves nothing behind."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.update.bundle import (
    BundleError,
    Manifest,
    Version,
    parse_public_key,
    public_key_text,
    trusted_keys,
    verify_bundle,
    write_bundle,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
V = Version.parse


def wheels(tmp: Path) -> list[Path]:
    tmp.mkdir(exist_ok=True)
    out = []
    for name, size in (
        ("meshpi-0.2.0-py3-none-any.whl", 3000),
        ("pynacl-1.5.0-cp36-abi3-linux_aarch64.whl", 700),
    ):
        p = tmp / name
        p.write_bytes(bytes(i % 251 for i in range(size)))
        out.append(p)
    return out


def bundle(tmp: Path, version: str = "0.2.0", key: Ed25519PrivateKey = KEY) -> Path:
    out = tmp / f"meshpi-{version}.bundle"
    write_bundle(out, wheels(tmp / "w"), V(version), "cp313", "aarch64", "2026-12-02T00:00:00Z", key)
    return out


def verify(
    path: Path | bytes, staging: Path, installed: str | None = "0.1.0", force: bool = False
) -> Manifest:
    data = path if isinstance(path, bytes) else path.read_bytes()
    ver = None if installed is None else V(installed)
    return verify_bundle(io.BytesIO(data), (KEY.public_key(),), staging, ver, force)


def refused(data: bytes, staging: Path, match: str, installed: str | None = "0.1.0") -> None:
    with pytest.raises(BundleError, match=match) as e:
        verify(data, staging, installed)
    assert e.value.status == 400 and e.value.message.startswith("update refused: ")
    assert not staging.exists(), "a refused bundle left files behind"


def retar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buf.getvalue()


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar]  # type: ignore[union-attr]


def test_update_bundle_verifies_and_stages_the_wheels(tmp_path: Path) -> None:
    manifest = verify(bundle(tmp_path), tmp_path / "staging")
    assert manifest.version == V("0.2.0") and manifest.python == "cp313"
    staged = sorted(p.name for p in (tmp_path / "staging").iterdir())
    assert staged == sorted(p.name for p in (tmp_path / "w").iterdir())
    for p in (tmp_path / "w").iterdir():
        assert (tmp_path / "staging" / p.name).read_bytes() == p.read_bytes()


def test_update_bundle_with_another_key_is_refused(tmp_path: Path) -> None:
    refused(bundle(tmp_path, key=OTHER).read_bytes(), tmp_path / "s", "does not match any trusted update key")


def test_update_bundle_with_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    parts = members(bundle(tmp_path))
    info, data = parts[2]
    assert data is not None
    parts[2] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    refused(retar(parts), tmp_path / "s", "does not match its SHA-256")


def test_update_bundle_with_a_tampered_manifest_is_refused(tmp_path: Path) -> None:
    parts = members(bundle(tmp_path))
    info, data = parts[0]
    assert data is not None
    forged = data.replace(b'"0.2.0"', b'"9.2.0"')
    info.size = len(forged)
    parts[0] = (info, forged)
    refused(retar(parts), tmp_path / "s", "signature")


def test_update_bundle_replayed_or_same_version_is_refused_unless_forced(tmp_path: Path) -> None:
    data = bundle(tmp_path, "0.2.0").read_bytes()
    refused(data, tmp_path / "s", r"older than the installed 0\.3\.0.*--force", installed="0.3.0")
    refused(data, tmp_path / "s", "is the installed version", installed="0.2.0")
    assert verify(data, tmp_path / "s", installed="0.3.0", force=True).version == V("0.2.0")


def test_update_bundle_truncated_anywhere_is_refused(tmp_path: Path) -> None:
    path = bundle(tmp_path)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + last.size  # past it, only the archive's zero padding
    for cut in (0, 100, 600, 1500, 2100, end // 2, end - 1):
        with pytest.raises(BundleError):
            verify(data[:cut], tmp_path / "s")
        assert not (tmp_path / "s").exists()


def test_update_bundle_extra_missing_or_reordered_members_are_refused(tmp_path: Path) -> None:
    parts = members(bundle(tmp_path))
    extra = tarfile.TarInfo("wheels/evil-1.0-py3-none-any.whl")
    extra.size = 3
    refused(retar([*parts, (extra, b"abc")]), tmp_path / "s", "is not in the manifest")
    refused(retar(parts[:-1]), tmp_path / "s", "listed but missing")
    refused(retar([parts[0], parts[1], parts[3], parts[2]]), tmp_path / "s", "should come")
    refused(retar([parts[1], parts[0], *parts[2:]]), tmp_path / "s", "must come first")


def test_update_bundle_links_and_traversal_are_refused(tmp_path: Path) -> None:
    parts = members(bundle(tmp_path))
    name = parts[2][0].name
    link = tarfile.TarInfo(name)
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    refused(retar([*parts[:2], (link, None), *parts[3:]]), tmp_path / "s", "not a regular file")
    escape = tarfile.TarInfo("../../etc/cron.d/x")
    escape.size = 3
    refused(retar([*parts[:2], (escape, b"abc")]), tmp_path / "s", "should come")
    assert not (tmp_path.parent / "etc").exists()


def test_update_bundle_oversized_header_is_refused_before_reading_it(tmp_path: Path) -> None:
    """A pax header that claims a gigabyte: refused after at most the head room."""
    info = tarfile.TarInfo("manifest.json")
    info.size = 1 << 30
    header = info.tobuf(tarfile.USTAR_FORMAT)

    class Endless(io.RawIOBase):
        served = 0

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            chunk = header if self.served == 0 else b"\0" * len(b)
            n = min(len(b), len(chunk))
            b[:n] = chunk[:n]
            self.served += n
            return n

    stream = Endless()
    with pytest.raises(BundleError, match="at most|bigger"):
        verify_bundle(stream, (KEY.public_key(),), tmp_path / "s", V("0.1.0"))  # type: ignore[arg-type]
    assert stream.served < 2 * 1024 * 1024


def test_update_bundle_manifest_fields_are_checked_by_name(tmp_path: Path) -> None:
    good = json.loads(Manifest.parse(members(bundle(tmp_path))[0][1] or b"").to_bytes())
    cases = {
        "version": ("1.2", "not a version"),
        "files": ([], "non-empty list"),
        "format": (2, "upgrade meshpi first"),
        "name": ("x" * 65, "short printable"),
    }
    for field, (value, match) in cases.items():
        with pytest.raises(BundleError, match=match):
            Manifest.parse(json.dumps({**good, field: value}).encode())
    bad_file = {**good, "files": [{"name": "wheels/../x.whl", "size": 1, "sha256": "0" * 64}]}
    with pytest.raises(BundleError, match=r"files\[0\]\.name"):
        Manifest.parse(json.dumps(bad_file).encode())
    with pytest.raises(BundleError, match="unknown field"):
        Manifest.parse(json.dumps({**good, "postinst": "rm -rf /"}).encode())


def test_update_bundle_without_trusted_keys_refuses_everything(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no update key is trusted"):
        verify_bundle(io.BytesIO(bundle(tmp_path).read_bytes()), (), tmp_path / "s", None)
    assert trusted_keys(tmp_path / "absent") == ()


def test_update_bundle_keys_round_trip_through_their_files(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "release.pub").write_text(public_key_text(KEY.public_key()) + "\n")
    (found,) = trusted_keys(tmp_path / "keys")
    assert public_key_text(found) == public_key_text(KEY.public_key())
    with pytest.raises(BundleError, match="32 bytes"):
        parse_public_key("AAAA", "release.pub")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_update_bundle_garbage_is_refused_cleanly(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(BundleError):
        verify(data, tmp_path / "fuzz")
    assert not (tmp_path / "fuzz").exists()

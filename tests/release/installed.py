"""An installed meshpi 0.2.0 as the update code sees it, in a temporary directory:
a trusted key, a versions directory with that version's metadata, and the `current`
link to it."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.update.bundle import public_key_text


def installed_layout(tmp_path: Path, key: Ed25519PrivateKey) -> dict[str, Path]:
    """{"keys", "versions", "current"} under `tmp_path`, trusting `key`."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "release.pub").write_text(public_key_text(key.public_key()) + "\n")
    versions = tmp_path / "versions"
    meta = versions / "0.2.0/lib/python3.13/site-packages/meshpi-0.2.0.dist-info/METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text("Metadata-Version: 2.1\nName: meshpi\nVersion: 0.2.0\n")
    (tmp_path / "current").symlink_to(versions / "0.2.0")
    return {"keys": keys, "versions": versions, "current": tmp_path / "current"}

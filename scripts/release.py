"""scripts/release: a signed update bundle from this checkout (see scripts/release --help)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from appliance.update.bundle import BundleError, Version, public_key_text, write_bundle  # noqa: E402


def new_key(path: Path) -> int:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"release: {path} exists; not overwriting a signing key", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    note = "keep it off the appliance and out of git"
    print(f"release: signing key written to {path} ({note})", file=sys.stderr)
    print(public_key_text(key.public_key()))
    return 0


def load_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"release: --key {path}: not a readable unencrypted PEM key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"release: --key {path}: not an Ed25519 key")
    return key


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/release", description="Make a signed meshpi update bundle.")
    ap.add_argument("--key", type=Path, help="the Ed25519 signing key (PEM)")
    ap.add_argument("--version", help="build meshpi as this version (default: pyproject.toml's)")
    ap.add_argument("--out", type=Path, default=ROOT / "out", help="where the bundle goes (default: out/)")
    ap.add_argument("--new-key", type=Path, metavar="FILE", help="make a signing key, print its public half")
    args = ap.parse_args()
    if args.new_key:
        return new_key(args.new_key)
    if not args.key:
        ap.error("--key FILE is required (or --new-key FILE to make one)")
    key = load_key(args.key)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    try:
        version = Version.parse(args.version or declared, "--version")
    except BundleError as e:
        raise SystemExit(f"release: {e.message}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshpi-release-") as tmp:
        wheels_dir = Path(tmp) / "wheels"
        print(f"release: building the arm64 wheels of meshpi {version} (scripts/wheels)", file=sys.stderr)
        cmd = [str(ROOT / "scripts/wheels"), str(wheels_dir)] + ([str(version)] if args.version else [])
        subprocess.run(cmd, check=True)
        wheels = sorted(wheels_dir.glob("*.whl"))
        # meshpi's own wheel first: an installer reads the version from the manifest,
        # a person reading the tar sees what it is.
        wheels.sort(key=lambda p: not p.name.startswith("meshpi-"))
        out = args.out / f"meshpi-{version}.bundle"
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = write_bundle(out, wheels, version, "cp313", "aarch64", created, key)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    size = out.stat().st_size
    took = time.monotonic() - t0
    print(
        f"release: {out} ({len(manifest.files)} wheels, {size / 1e6:.1f} MB, {took:.0f} s)", file=sys.stderr
    )
    print(json.dumps({"bundle": str(out), "version": str(version), "wheels": len(manifest.files),
                      "bytes": size, "sha256": digest}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

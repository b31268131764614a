"""A meshpi release bundle: what an appliance installs to update itself, and the
checks it passes before anything on the appliance changes.

A bundle is an uncompressed tar (the wheels inside are zip files already), in
this order:

    manifest.json   what the release is: name, version, Python and platform, and
                    each wheel's name, size and SHA-256
    manifest.sig    64 bytes: Ed25519 over manifest.json's exact bytes
    wheels/*.whl    exactly the wheels the manifest lists, in its order

The order lets a bundle be checked as it streams in (an upload, a download):
the signature is checked against the trusted keys before a single wheel byte is
read, and each wheel is hashed while it is copied into a private staging
directory. Anything else refuses the whole bundle with a message that says
why: a member not listed, listed twice or missing, a link or a device, a path
other than wheels/<file>.whl, sizes over the limits, a version that is not
newer than the installed one (a downgrade is the console's `--force`).

The signing key lives with whoever makes releases (scripts/release); the
appliance holds only public keys (image and install.sh: /etc/meshpi/update-keys).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from appliance.base.errors import MeshpiError

if TYPE_CHECKING:  # cryptography (~7 MB) is loaded by what checks or signs, not by every importer
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = 1
MAX_MANIFEST = 256 * 1024
MAX_WHEELS = 200
MAX_WHEEL = 64 * 1024 * 1024
MAX_TOTAL = 256 * 1024 * 1024
# A wheel's file name as PEP 427 spells it, nothing that could leave wheels/.
_WHEEL = re.compile(r"wheels/([A-Za-z0-9_.]+-[A-Za-z0-9_.+!-]+\.whl)")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


class BundleError(MeshpiError):
    """A bundle refused; nothing on the appliance changed."""

    def __init__(self, message: str) -> None:
        super().__init__(400, f"update refused: {message}")


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: object, what: str = "version") -> Version:
        if not isinstance(text, str) or not _VERSION.fullmatch(text):
            raise BundleError(f"{what}: {text!r} is not a version like 1.2.3")
        major, minor, patch = (int(p) for p in text.split("."))
        return cls(major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class BundleFile:
    name: str  # wheels/<file>.whl
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: Version
    python: str  # e.g. "cp313"
    platform: str  # e.g. "aarch64"
    created: str  # ISO 8601, for people
    files: tuple[BundleFile, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "name": self.name,
            "version": str(self.version),
            "python": self.python,
            "platform": self.platform,
            "created": self.created,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest.json is not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise BundleError("manifest.json must hold an object")
        known = {"format", "name", "version", "python", "platform", "created", "files"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise BundleError(f"manifest.json: {unknown[0]!r} is an unknown field (a newer bundle format?)")
        if doc.get("format") != FORMAT:
            found = doc.get("format")
            raise BundleError(f"manifest.json: format {found!r} is not {FORMAT}: upgrade meshpi first")
        texts = {k: _text(doc, k) for k in ("name", "python", "platform", "created")}
        raw_files = doc.get("files")
        if not isinstance(raw_files, list) or not raw_files:
            raise BundleError("manifest.json: files must be a non-empty list")
        if len(raw_files) > MAX_WHEELS:
            raise BundleError(f"manifest.json: {len(raw_files)} files is more than {MAX_WHEELS}")
        files = tuple(_file(i, f) for i, f in enumerate(raw_files))
        names = [f.name for f in files]
        if len(set(names)) != len(names):
            raise BundleError("manifest.json: a wheel is listed twice")
        if sum(f.size for f in files) > MAX_TOTAL:
            raise BundleError(f"manifest.json: the wheels add up to more than {MAX_TOTAL} bytes")
        version = Version.parse(doc.get("version"), "manifest.json: version")
        return cls(texts["name"], version, texts["python"], texts["platform"], texts["created"], files)


def _text(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not value.isprintable():
        raise BundleError(f"manifest.json: {key}: {value!r} must be a short printable string")
    return value


def _file(i: int, obj: object) -> BundleFile:
    where = f"manifest.json: files[{i}]"
    if not isinstance(obj, dict) or set(obj) != {"name", "size", "sha256"}:
        raise BundleError(f"{where} must be an object with name, size and sha256")
    name, size, sha = obj["name"], obj["size"], obj["sha256"]
    if not isinstance(name, str) or not _WHEEL.fullmatch(name):
        raise BundleError(f"{where}.name: {name!r} is not wheels/<file>.whl")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_WHEEL:
        raise BundleError(f"{where}.size: {size!r} is not between 1 and {MAX_WHEEL}")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise BundleError(f"{where}.sha256: {sha!r} is not a lowercase SHA-256 in hex")
    return BundleFile(name, size, sha)


# -- keys ---------------------------------------------------------------------------


def public_key_text(key: Ed25519PublicKey) -> str:
    """The form of an update key in /etc/meshpi/update-keys/*.pub: raw, base64."""
    return base64.b64encode(key.public_bytes_raw()).decode()


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise BundleError(f"{where}: not base64") from None
    if len(raw) != 32:
        raise BundleError(f"{where}: an Ed25519 public key is 32 bytes, not {len(raw)}")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def trusted_keys(directory: Path) -> tuple[Ed25519PublicKey, ...]:
    """The keys in `directory`/*.pub; none (or no directory) means no update is trusted."""
    if not directory.is_dir():
        return ()
    return tuple(parse_public_key(p.read_text(), str(p)) for p in sorted(directory.glob("*.pub")))


# -- writing (scripts/release) ------------------------------------------------------


def write_bundle(
    out: Path, wheels: Sequence[Path], version: Version, python: str, platform: str, created: str,
    key: Ed25519PrivateKey,
) -> Manifest:  # fmt: skip
    files = tuple(BundleFile(f"wheels/{w.name}", w.stat().st_size, _sha256(w)) for w in wheels)
    manifest = Manifest("meshpi", version, python, platform, created, files)
    Manifest.parse(manifest.to_bytes())  # what the appliance will check, checked here first
    raw = manifest.to_bytes()
    tmp = out.with_name(f".{out.name}.part")
    # POSIX (pax) headers for wheel names over ustar's 100 characters; the manifest and
    # the signature need none, and the appliance reads those before allowing any.
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "manifest.json", raw)
        _add_bytes(tar, "manifest.sig", key.sign(raw))
        for wheel, f in zip(wheels, files, strict=True):
            info = tarfile.TarInfo(f.name)
            info.size, info.mode, info.mtime = f.size, 0o644, 0
            with wheel.open("rb") as src:
                tar.addfile(info, src)
    tmp.replace(out)
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- checking (the appliance) -------------------------------------------------------


def verify_bundle(
    stream: IO[bytes],
    trusted: Sequence[Ed25519PublicKey],
    staging: Path,
    installed: Version | None,
    force: bool = False,
) -> Manifest:
    """Check a bundle as it is read and leave its wheels in `staging` (made
    empty first). Raises BundleError, with `staging` removed, on anything wrong."""
    if not trusted:
        raise BundleError("no update key is trusted on this device (/etc/meshpi/update-keys is empty)")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700, parents=True)
    try:
        return _verify(stream, trusted, staging, installed, force)
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, EOFError) or "unexpected end of data" in str(e):
            raise BundleError(f"the bundle ends early: it is truncated ({e})") from None
        raise BundleError(f"not a readable bundle ({type(e).__name__}: {e})") from None


def _verify(
    stream: IO[bytes],
    trusted: Sequence[Ed25519PublicKey],
    staging: Path,
    installed: Version | None,
    force: bool,
) -> Manifest:
    # Until the manifest is known to be signed, a bundle gets the bytes its first
    # two members may take and no more: a forged size (a 1 GB extended header)
    # ends the read, not the device's memory.
    limited = _Limited(stream, _HEAD_ROOM)
    # "r|": a stream, read once, front to back: nothing is sought, nothing buffered whole.
    with tarfile.open(fileobj=limited, mode="r|") as tar:  # type: ignore[call-overload]
        members = iter(tar)
        raw = _small(tar, next(members, None), "manifest.json", MAX_MANIFEST)
        signature = _small(tar, next(members, None), "manifest.sig", 64)
        if not any(_signed(k, signature, raw) for k in trusted):
            raise BundleError("the signature does not match any trusted update key")
        manifest = Manifest.parse(raw)
        # Each wheel: its header, perhaps a pax header for a long name, its data.
        limited.limit += sum(3 * _BLOCK + _padded(len(f.name) + 64) + _padded(f.size) for f in manifest.files)
        _check_version(manifest.version, installed, force)
        for expected in manifest.files:
            member = next(members, None)
            if member is None:
                raise BundleError(f"{expected.name} is listed but missing (a truncated bundle?)")
            if member.name != expected.name:
                raise BundleError(f"{member.name!r} where {expected.name} should come")
            if not member.isreg() or member.size != expected.size:
                raise BundleError(f"{member.name} is not a regular file of {expected.size} bytes")
            _copy_hashed(tar, member, staging / Path(expected.name).name, expected)
        extra = next(members, None)
        if extra is not None:
            raise BundleError(f"{extra.name!r} is not in the manifest")
    return manifest


_BLOCK = 512
_SLACK = 4 * 10240  # the end-of-archive blocks and tarfile's read-ahead (records of 10240)
_HEAD_ROOM = 4 * _BLOCK + MAX_MANIFEST + _BLOCK + _SLACK


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


class _Limited:
    """A stream that refuses to give more than `limit` bytes in all."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw, self.limit, self.count = raw, limit, 0

    def read(self, n: int = -1) -> bytes:
        room = self.limit - self.count
        if n < 0 or n > room:
            n = room + 1  # one more than allowed: enough to know it is too much
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.limit:
            raise BundleError(f"the bundle is bigger than its manifest says (over {self.limit} bytes read)")
        return data


def _small(tar: tarfile.TarFile, member: tarfile.TarInfo | None, name: str, limit: int) -> bytes:
    if member is None or member.name != name:
        found = "nothing" if member is None else repr(member.name)
        place = "first" if name == "manifest.json" else "second"
        raise BundleError(f"{name} must come {place}, found {found}")
    if not member.isreg() or member.size > limit:
        raise BundleError(f"{name} is not a regular file of at most {limit} bytes")
    f = tar.extractfile(member)
    assert f is not None
    data = f.read()
    if len(data) != member.size:
        raise BundleError(f"{name} is truncated")
    return data


def _signed(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _check_version(new: Version, installed: Version | None, force: bool) -> None:
    if installed is None or force:
        return
    if new == installed:
        raise BundleError(f"version {new} is the installed version")
    if new < installed:
        raise BundleError(
            f"version {new} is older than the installed {installed} (a replayed release?); "
            "a downgrade needs `meshpi update --force` on the console"
        )


def _copy_hashed(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, expected: BundleFile) -> None:
    src = tar.extractfile(member)
    assert src is not None
    h, size = hashlib.sha256(), 0
    with dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            size += len(chunk)
            h.update(chunk)
            out.write(chunk)
    if size != expected.size:
        raise BundleError(f"{expected.name} is truncated ({size} of {expected.size} bytes)")
    if h.hexdigest() != expected.sha256:
        raise BundleError(f"{expected.name} does not match its SHA-256 in the signed manifest (tampered?)")

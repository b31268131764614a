"""Fetching a bundle from the update URL (prefs `update_url`, default none: off).

Root's meshpi-update-check.timer runs `meshpi-update check` daily: the bundle at the URL
is downloaded (at most MAX_UPLOAD bytes, whatever the server says) and checked as an
upload is (signature, hashes); when it is newer than what runs it is recorded as
available and applied, unless that very version was already rolled back here (then it
stays "available" for the owner to see, and is not retried every day). What the check
found is /var/lib/meshpi-update/available.json, which the agent's status shows.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.base.files import atomic_write
from appliance.update.bundle import BundleError, Manifest, Version, verify_bundle
from appliance.update.spool import MAX_UPLOAD
from appliance.update.state import read_json

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds without a byte from the server
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Found:
    """What one check found: a newer bundle (`bundle`, `manifest`) or nothing new."""

    url: str
    checked: float
    manifest: Manifest | None
    bundle: Path | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        version = str(self.manifest.version) if self.manifest is not None else None
        return {"url": self.url, "checked": self.checked, "version": version, "error": self.error}


def download(url: str, dest: Path, limit: int = MAX_UPLOAD, timeout: float = TIMEOUT) -> int:
    """`url` into `dest` (0600); its size. Raises BundleError (nothing left) on an HTTP
    error, a refused connection, or more than `limit` bytes (counted, not believed)."""
    dest.unlink(missing_ok=True)
    request = urllib.request.Request(url, headers={"User-Agent": "meshpi-update"})
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - http(s) only (prefs)
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise BundleError(f"{url} offers {int(length)} bytes, more than a bundle may be ({limit})")
            with dest.open("xb") as out:
                dest.chmod(0o600)
                while chunk := answer.read(_CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise BundleError(f"{url} sent more than a bundle may be ({limit} bytes)")
                    out.write(chunk)
            if length is not None and length.isdigit() and size != int(length):
                raise BundleError(f"{url}: the download ended after {size} of {length} bytes (truncated)")
    except BundleError:
        dest.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as e:
        dest.unlink(missing_ok=True)
        raise BundleError(f"{url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        dest.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise BundleError(f"{url}: cannot download ({reason})") from None
    return size


def check(
    url: str,
    work: Path,
    trusted: tuple[Ed25519PublicKey, ...],
    installed: Version | None,
    now: float | None = None,
) -> Found:
    """Download and check the bundle at `url`; a Found with the bundle when it is newer.
    A refusal (signature, hashes, size, download) is a Found with `error`, not raised."""
    now = time.time() if now is None else now
    work.mkdir(mode=0o755, parents=True, exist_ok=True)
    bundle, staging = work / "download.bundle", work / ".check-staging"
    try:
        size = download(url, bundle)
        with bundle.open("rb") as f:
            # installed=None: an older or the same version is "nothing new", not a refusal.
            manifest = verify_bundle(f, trusted, staging, None)
    except BundleError as e:
        bundle.unlink(missing_ok=True)
        log.warning("update check: %s", e.message)
        return Found(url, now, None, None, e.message)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if installed is not None and manifest.version <= installed:
        bundle.unlink()
        log.info("update check: %s offers %s; %s runs: nothing new", url, manifest.version, installed)
        return Found(url, now, None, None)
    log.info("update check: %s offers %s (%d bytes), newer than %s", url, manifest.version, size, installed)
    return Found(url, now, manifest, bundle)


def record(found: Found, path: Path) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(path, json.dumps(found.to_json()) + "\n", mode=0o644)


def rolled_back_before(version: Version, result_file: Path) -> bool:
    """Was `version` the last update, and rolled back? (Then it is not retried daily.)"""
    last = read_json(result_file)
    return last is not None and last.get("result") == "rolled back" and last.get("version") == str(version)

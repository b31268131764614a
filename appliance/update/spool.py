"""The hand-over of a dashboard upload from the web user to root.

The dashboard (user meshpi-web, no privileges) checks an uploaded bundle, writes it to
`<spool>/.upload-*.part` in its own state directory, and renames it to
`<spool>/upload.bundle`; meshpi-update.path sees the name and starts
meshpi-update.service (root), which runs `meshpi-update spool`: `take_upload` copies
the file to a place only root can write, removes it from the spool, and the copy is
checked again from the start (signature, hashes, version) before anything changes.
Root never trusts the web user's check, and never follows a link the web user made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import IO

from appliance.update.bundle import MAX_MANIFEST, MAX_TOTAL, BundleError
from appliance.update.state import UPLOAD

log = logging.getLogger(__name__)

# The largest upload taken: every wheel at the limit, plus the manifest and tar's
# headers. The dashboard refuses more before it writes a byte past it.
MAX_UPLOAD = MAX_TOTAL + MAX_MANIFEST + 1024 * 1024
_CHUNK = 1024 * 1024


def take_upload(spool: Path, dest: Path) -> Path | None:
    """Move the waiting upload out of `spool` into `dest` (root's, 0600); None when
    nothing waits. Raises BundleError (the upload removed) for a link, a device, a
    directory or an oversized file."""
    try:
        # O_NOFOLLOW on the directory and the file: a link the web user left (to
        # /etc/shadow, say) is refused, not read.
        dir_fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BundleError(f"the upload directory {spool} is not a directory ({e.strerror})") from None
    try:
        try:
            fd = os.open(UPLOAD, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            _remove(dir_fd)
            raise BundleError(f"the upload is not a regular file ({e.strerror})") from None
        with os.fdopen(fd, "rb") as src:
            st = os.fstat(src.fileno())
            if not stat.S_ISREG(st.st_mode):
                _remove(dir_fd)
                raise BundleError("the upload is not a regular file")
            if st.st_size > MAX_UPLOAD:
                _remove(dir_fd)
                raise BundleError(f"the upload is {st.st_size} bytes, more than a bundle may be")
            _copy(src, dest)
        _remove(dir_fd)
    finally:
        os.close(dir_fd)
    log.info("update: took the dashboard's upload (%d bytes) into %s", dest.stat().st_size, dest)
    return dest


def _copy(src: IO[bytes], dest: Path) -> None:
    dest.unlink(missing_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    copied = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_CHUNK):
            copied += len(chunk)
            if copied > MAX_UPLOAD:  # it grew while being read
                out.close()
                dest.unlink()
                raise BundleError(f"the upload grew past {MAX_UPLOAD} bytes while it was read")
            out.write(chunk)


def _remove(dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(UPLOAD, dir_fd=dir_fd)

"""Where an update's state lives, and the `update` slot of the agent's status.

    /opt/meshpi-versions/last-update.json   the last apply's result (meshpi-update writes it)
    /opt/meshpi-versions/progress.json      an apply under way: version, step, since
    /var/lib/meshpi-web/update/upload.bundle the dashboard's checked upload, waiting for
                                             meshpi-update.path to start the root unit
    /var/lib/meshpi-update/available.json   a newer bundle seen at the update URL (when set)

The dashboard (user meshpi-web) writes only the upload, in its own state directory; the
apply runs as root in meshpi-update.service, which rereads and rechecks it. The agent
reads these files for its status; it never writes them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.base.files import atomic_write

if TYPE_CHECKING:  # the agent reads the slot without loading the bundle's crypto
    from appliance.update.install import Layout

log = logging.getLogger(__name__)

VERSIONS = Path("/opt/meshpi-versions")
CURRENT = Path("/opt/meshpi")
KEYS = Path("/etc/meshpi/update-keys")
RESULT = "last-update.json"
PROGRESS = "progress.json"
SPOOL = Path("/var/lib/meshpi-web/update")
UPLOAD = "upload.bundle"
AVAILABLE = Path("/var/lib/meshpi-update/available.json")
# A progress file older than this is what a crash or a power cut left, not an update.
STALE = 3600.0


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object from `path`; None if absent or unreadable (status must not fail on it)."""
    try:
        with path.open("rb") as f:
            raw = f.read(64 * 1024)
        doc = json.loads(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("update: %s is unreadable (%s); ignored", path, e)
        return None
    return doc if isinstance(doc, dict) else None


def update_slot(
    running: str,
    versions: Path = VERSIONS,
    available: Path = AVAILABLE,
    now: float | None = None,
) -> dict[str, Any]:
    """The status's `update`: the version running, the last update's result, an
    update under way, a newer bundle seen at the update URL (None: none known), and
    when that URL was last looked at."""
    now = time.time() if now is None else now
    last = read_json(versions / RESULT)
    progress = read_json(versions / PROGRESS)
    if progress is not None and now - float(progress.get("since", 0) or 0) > STALE:
        progress = None
    check = read_json(available)
    found = check if check is not None and check.get("version") not in (None, running) else None
    return {
        "current": running,
        "last": {k: last.get(k) for k in ("result", "version", "previous", "reason", "seconds", "time")}
        if last is not None
        else None,
        "installing": {k: progress.get(k) for k in ("version", "step", "since")} if progress else None,
        "available": found,
        # The last look at the update URL (None: no URL, or not looked yet).
        "checked": {k: check.get(k) for k in ("url", "checked", "error")} if check is not None else None,
    }


def write_progress(versions: Path, version: str | None, step: str, since: float) -> None:
    atomic_write(versions / PROGRESS, json.dumps({"version": version, "step": step, "since": since}) + "\n")


def clear_progress(versions: Path) -> None:
    (versions / PROGRESS).unlink(missing_ok=True)


def running_version(layout: Layout) -> str:
    v = layout.running_version()
    return str(v) if v is not None else "unknown"

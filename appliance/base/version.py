"""The installed version of a distribution, read from its dist-info's METADATA.

importlib.metadata answers the same, but loading it (zipfile, csv, email parsing,
entry-point machinery) costs the long-running agent about 1.8 MB of RSS for one
string (issue 14); this reads the one header line it needs.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_VERSION = re.compile(r"^Version:\s*(\S+)\s*$", re.MULTILINE)


def installed_version(dist: str, path: list[str] | None = None) -> str | None:
    """`dist`'s version from the first `<dist>-<version>.dist-info/METADATA` on the
    path (sys.path by default), as importlib.metadata finds it; None if not installed."""
    name = re.sub(r"[-_.]+", "_", dist).lower()
    for entry in sys.path if path is None else path:
        try:
            candidates = sorted(Path(entry or ".").glob("*.dist-info"))
        except OSError:
            continue
        for info in candidates:
            if re.sub(r"[-_.]+", "_", info.name.removesuffix(".dist-info").rsplit("-", 1)[0]).lower() != name:
                continue
            try:
                found = _VERSION.search((info / "METADATA").read_text(errors="replace"))
            except OSError:
                continue
            if found:
                return found[1]
    return None

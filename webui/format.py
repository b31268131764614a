"""Jinja filters: byte counts, "how long ago", and the agent's status in words."""

from __future__ import annotations

import time
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask


def human_bytes(n: object) -> str:
    value = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def ago(when: object, now: float | None = None) -> str:
    if not isinstance(when, int | float) or when <= 0:
        return "never"
    seconds = max(0, int((now if now is not None else time.time()) - when))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def clock(when: object) -> str:
    if not isinstance(when, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def clock_of(iso: object) -> str:
    """An ISO 8601 time (control's key expiry) as the local wall clock, e.g. 22:57."""
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    return time.strftime("%H:%M", time.localtime(when.timestamp()))


def firstboot_errors(st: dict[str, Any]) -> list[str]:
    """What first boot could not use from meshpi.toml on the boot partition."""
    fb = st.get("firstboot")
    if not isinstance(fb, dict):
        return []
    found: list[str] = []
    for key in ("error", "errors"):
        value = fb.get(key)
        if isinstance(value, str) and value:
            found.append(value)
        elif isinstance(value, list):
            found.extend(str(v) for v in value if v)
    return found


def web_version() -> str:
    """This package's version, for pages shown without the agent (login, setup)."""
    try:
        return version("meshpi")
    except PackageNotFoundError:
        return "unknown"


def init_app(app: Flask) -> None:
    app.jinja_env.filters["bytes"] = human_bytes
    app.jinja_env.filters["ago"] = ago
    app.jinja_env.filters["clock"] = clock
    app.jinja_env.filters["clock_of"] = clock_of
    app.jinja_env.globals["firstboot_errors"] = firstboot_errors
    app.jinja_env.globals["web_version"] = web_version

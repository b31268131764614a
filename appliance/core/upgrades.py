"""Debian's security updates on the appliance (issue 15, part 1), pure.

The owner's switch and nightly window (prefs `auto_upgrades`, `upgrade_window`) become
apt's configuration for unattended-upgrades and drop-ins for apt's two timers; what
apt hands its hooks and what they wrote become a small log and a status. The files
are written and read by kernel/upgrades.py.

Why apt's own machinery: Debian's `apt-daily.timer` (package lists) and
`apt-daily-upgrade.timer` (unattended-upgrade) are what every Debian system runs; we
only move them into the window, limit the origins to security and stable-updates,
and record what happened somewhere that survives the journal in RAM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.wire.fields import parse_str

# Debian's security archive (trixie-security, label Debian-Security) and stable-updates
# (trixie-updates: urgent fixes between point releases). Not the main suite's point
# releases, which Debian's own 50unattended-upgrades also allows.
ORIGIN_PATTERNS = (
    "origin=Debian,codename=${distro_codename}-security,label=Debian-Security",
    "origin=Debian,codename=${distro_codename},label=Debian-Security",
    "origin=Debian,codename=${distro_codename}-updates",
)
# Packages whose new version only takes effect after a reboot: the kernel (and the
# Pi's firmware, which loads it), and the C library every running process has mapped.
REBOOT_PACKAGES = frozenset({"libc6", "raspi-firmware"})
REBOOT_PREFIXES = ("linux-image-",)
MIN_WINDOW_MINUTES = 30  # lists, then the upgrade, then a reboot
LOG_KEEP = 100  # records in upgrades.log (one per dpkg run that changed something)
LOG_MAX_BYTES = 64 * 1024
RECORD_MAX_PACKAGES = 500
HOOK = "/usr/local/bin/meshpi-upgrades"  # the command apt runs (install.sh, the image)


@dataclass(frozen=True, order=True)
class Window:
    """A nightly window, minutes after midnight local time; end < start wraps midnight."""

    start: int
    end: int

    @property
    def minutes(self) -> int:
        return (self.end - self.start) % (24 * 60)

    def at(self, offset: int) -> str:
        """HH:MM, `offset` minutes into the window."""
        t = (self.start + offset) % (24 * 60)
        return f"{t // 60:02d}:{t % 60:02d}"

    def __str__(self) -> str:
        return f"{self.at(0)}-{self.at(self.minutes)}"


DEFAULT_WINDOW = Window(3 * 60, 5 * 60)


def parse_window(value: object) -> Window:
    text = parse_str(value).strip()
    m = re.fullmatch(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})", text)
    if m is None:
        raise ValueError("is not a window like 03:00-05:00 (HH:MM-HH:MM, local time)")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError("has a time that is not on a clock (00:00 to 23:59)")
    window = Window(h1 * 60 + m1, h2 * 60 + m2)
    if window.minutes < MIN_WINDOW_MINUTES:
        raise ValueError(f"is shorter than {MIN_WINDOW_MINUTES} minutes (lists, upgrade, reboot)")
    return window


# -- configuration -------------------------------------------------------------


def apt_conf(enabled: bool) -> str:
    """/etc/apt/apt.conf.d/52meshpi-upgrades: after Debian's 20auto-upgrades and
    50unattended-upgrades, so its values win and its origin list replaces theirs."""
    on = "1" if enabled else "0"
    patterns = "".join(f'    "{p}";\n' for p in ORIGIN_PATTERNS)
    return f"""\
// Written by meshpi-upgrades from /var/lib/meshpi/prefs.json (auto_upgrades,
// upgrade_window); `meshpi set --auto-upgrades/--upgrade-window` changes it.
APT::Periodic::Enable "1";
APT::Periodic::Update-Package-Lists "{on}";
APT::Periodic::Download-Upgradeable-Packages "0";
APT::Periodic::Unattended-Upgrade "{on}";
// Keep the card's package cache small.
APT::Periodic::AutocleanInterval "7";
#clear Unattended-Upgrade::Origins-Pattern;
#clear Unattended-Upgrade::Allowed-Origins;
Unattended-Upgrade::Origins-Pattern {{
{patterns}}};
// A kernel or libc upgrade (the hook below marks /run/reboot-required) reboots
// right after the run, which the timers keep inside the window.
Unattended-Upgrade::Automatic-Reboot "true";
Unattended-Upgrade::Automatic-Reboot-WithUsers "true";
Unattended-Upgrade::Automatic-Reboot-Time "now";
Unattended-Upgrade::Remove-Unused-Kernel-Packages "true";
Unattended-Upgrade::Remove-New-Unused-Dependencies "true";
// What was upgraded, kept in /var/lib/meshpi/upgrades.log (the journal is in RAM).
// `|| cat`: apt must never fail, or block on a full pipe, because the hook is gone.
DPkg::Pre-Install-Pkgs {{ "{HOOK} hook-pre || cat >/dev/null"; }};
DPkg::Tools::Options::{HOOK}::Version "2";
DPkg::Post-Invoke {{ "{HOOK} hook-post || true"; }};
"""


def timer_dropins(window: Window) -> dict[str, str]:
    """Drop-ins for apt's timers, by unit: package lists in the window's first third,
    the upgrade in its second, the last third left for the upgrade and a reboot.
    Not Persistent: a Pi that was off at night must not upgrade (and reboot) at boot."""
    third = window.minutes // 3
    head = "# Written by meshpi-upgrades: the nightly window of prefs.upgrade_window.\n[Timer]\nOnCalendar=\n"

    def timer(offset: int) -> str:
        at = window.at(offset)
        return f"{head}OnCalendar=*-*-* {at}\nRandomizedDelaySec={third * 60}\nPersistent=false\n"

    return {"apt-daily.timer": timer(0), "apt-daily-upgrade.timer": timer(third)}


# -- apt's hooks ---------------------------------------------------------------


@dataclass(frozen=True)
class PackageChange:
    name: str
    old: str | None  # None: newly installed
    new: str


class HookInputError(ValueError):
    pass


def parse_hook_v2(text: str) -> tuple[PackageChange, ...]:
    """apt's Pre-Install-Pkgs protocol version 2 (apt.conf(5)): "VERSION 2", the
    configuration (key=value), a blank line, then per package
    `name old-version direction new-version action`; upgrades and installs are '<'."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "VERSION 2":
        raise HookInputError(f"apt hook input does not start with 'VERSION 2': {lines[:1]!r}")
    try:
        blank = lines.index("", 1)
    except ValueError:
        raise HookInputError("apt hook input has no blank line after its configuration") from None
    changes = []
    for line in lines[blank + 1 :]:
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 5:
            raise HookInputError(f"apt hook line {line[:200]!r} has {len(fields)} fields, not 5")
        name, old, direction, new, action = fields
        if direction != "<" or action in ("**REMOVE**", "**CONFIGURE**") or new == "-":
            continue
        changes.append(PackageChange(name.split(":")[0], None if old == "-" else old, new))
    return tuple(dict.fromkeys(changes))


def needs_reboot(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(n for n in names if n in REBOOT_PACKAGES or n.startswith(REBOOT_PREFIXES))


@dataclass(frozen=True)
class Record:
    """One line of upgrades.log: what one dpkg run installed or upgraded."""

    time: float
    packages: tuple[PackageChange, ...]
    reboot: tuple[str, ...]  # the packages among them that need a reboot

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "packages": [{"name": p.name, "from": p.old, "to": p.new} for p in self.packages],
            "reboot": list(self.reboot),
        }


class LogError(ValueError):
    pass


def _text(obj: dict[str, Any], key: str, where: str, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > 200 or any(c.isspace() for c in value):
        raise LogError(f"{where}: {key} {value!r} is not a package name or version")
    return value


def parse_record(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LogError(f"{where}: {line[:40]!r} is not JSON: {e.msg}") from None
    if not isinstance(obj, dict) or set(obj) != {"time", "packages", "reboot"}:
        raise LogError(f"{where}: {line[:40]!r} is not a record with time, packages and reboot")
    when = obj["time"]
    if isinstance(when, bool) or not isinstance(when, int | float) or not 0 <= when < 2**40:
        raise LogError(f"{where}: time {when!r} is not a time")
    packages, reboot = obj["packages"], obj["reboot"]
    if not isinstance(packages, list) or len(packages) > RECORD_MAX_PACKAGES:
        raise LogError(f"{where}: packages is not a list of at most {RECORD_MAX_PACKAGES}")
    changes = []
    for i, p in enumerate(packages):
        if not isinstance(p, dict) or set(p) != {"name", "from", "to"}:
            raise LogError(f"{where}: packages[{i}] {p!r} is not {{name, from, to}}")
        at = f"{where}: packages[{i}]"
        name, new = str(_text(p, "name", at)), str(_text(p, "to", at))
        changes.append(PackageChange(name, _text(p, "from", at, True), new))
    if not isinstance(reboot, list) or not all(isinstance(n, str) for n in reboot):
        raise LogError(f"{where}: reboot {reboot!r} is not a list of package names")
    return Record(float(when), tuple(changes), tuple(reboot))


def append_record(log_text: str, record: Record) -> str:
    """The log with `record` added, cut to the last LOG_KEEP records and LOG_MAX_BYTES
    (a card in a cupboard for years gets a bounded file)."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    lines.append(json.dumps(record.to_json(), separators=(",", ":")))
    lines = lines[-LOG_KEEP:]
    while len(lines) > 1 and sum(len(line) + 1 for line in lines) > LOG_MAX_BYTES:
        lines.pop(0)
    return "\n".join(lines) + "\n"


# -- status --------------------------------------------------------------------


def upgrades_status(
    *,
    enabled: bool,
    window: Window,
    last_checked: float | None,
    last_run: float | None,
    log_tail: Sequence[str],
    reboot_required: bool,
    reboot_for: Sequence[str],
    log_name: str = "upgrades.log",
) -> dict[str, Any]:
    """The LocalAPI's `upgrades` object. A garbage log line is not trusted: it is named
    in `error`, and `last_upgraded` comes from the last good record before it, if any."""
    error = None
    last: Record | None = None
    for n, line in reversed(list(enumerate(log_tail, 1))):
        if not line.strip():
            continue
        try:
            last = parse_record(line, f"{log_name} line {n} of the last {len(log_tail)}")
            break
        except LogError as e:
            error = error or str(e)
    return {
        "enabled": enabled,
        "window": str(window),
        "last_checked": last_checked,
        "last_run": last_run,
        "last_upgraded": None if last is None else last.to_json(),
        "reboot_pending": reboot_required,
        "reboot_for": list(reboot_for),
        "error": error,
    }


def format_upgrades(up: dict[str, Any], now: float) -> str:
    """One line for `meshpi status`."""

    def ago(t: float | None) -> str:
        if t is None:
            return "never"
        s = max(0, now - t)
        return f"{s / 86400:.0f}d ago" if s >= 86400 else f"{s / 3600:.0f}h ago"

    state = f"on, {up.get('window')}" if up.get("enabled") else "off"
    last = up.get("last_upgraded")
    what = "nothing yet"
    if last:
        names = [p["name"] for p in last["packages"]]
        what = f"{', '.join(names[:5])}{' …' if len(names) > 5 else ''} ({ago(last['time'])})"
    line = f"upgrades: {state}; checked {ago(up.get('last_checked'))}; last upgraded {what}"
    if up.get("reboot_pending"):
        line += f"; reboot pending ({', '.join(up.get('reboot_for') or []) or 'reboot-required'})"
    if up.get("error"):
        line += f"; error: {up['error']}"
    return line

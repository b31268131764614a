"""Debian's security updates on the system: apt's configuration and timer drop-ins
written from the prefs, apt's hooks (what was upgraded, whether a reboot is due), and
the status read back from files, without root's privileges beyond reading them.

Who runs what:
- `meshpi-upgrades configure` (meshpi-upgrades.service, root, started at boot and by
  meshpi-upgrades.path whenever prefs.json changes): writes the files, moves the
  timers. The agent stays sandboxed (read-only /etc) and never writes apt's config.
- `meshpi-upgrades hook-pre` / `hook-post`: apt runs them around each dpkg run
  (DPkg::Pre-Install-Pkgs, DPkg::Post-Invoke in the apt.conf written here).
- `read_status`: the agent's LocalAPI status, from the log, apt's stamps and
  /run/reboot-required (all world- or root-readable files, no writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.base.files import atomic_write
from appliance.core.prefs import Prefs
from appliance.core.upgrades import (
    HookInputError,
    PackageChange,
    Record,
    append_record,
    apt_conf,
    needs_reboot,
    parse_hook_v2,
    timer_dropins,
    upgrades_status,
)
from appliance.kernel.base import KernelError

log = logging.getLogger(__name__)

TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")
DROPIN = "meshpi.conf"
TAIL_BYTES = 8 * 1024  # of upgrades.log, for the status: its last records
HOOK_INPUT_MAX = 4 * 1024 * 1024  # apt's configuration dump plus one line per package


@dataclass(frozen=True)
class UpgradePaths:
    apt_conf: Path = Path("/etc/apt/apt.conf.d/52meshpi-upgrades")
    units: Path = Path("/etc/systemd/system")  # <timer>.d/meshpi.conf
    log: Path = Path("/var/lib/meshpi/upgrades.log")
    pending: Path = Path("/run/meshpi-upgrades/pending.json")  # between apt's two hooks
    reboot_required: Path = Path("/run/reboot-required")  # what unattended-upgrades checks
    stamps: Path = Path("/var/lib/apt/periodic")  # apt.systemd.daily's

    def dropin(self, timer: str) -> Path:
        return self.units / f"{timer}.d" / DROPIN


# -- configuration -------------------------------------------------------------


def _put(path: Path, text: str) -> bool:
    """Write `text` unless the file already holds it; True when it changed."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, 0o644)
    log.info("wrote %s", path)
    return True


Systemctl = Callable[..., subprocess.CompletedProcess[str]]


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120, check=False)


def configure(
    prefs: Prefs,
    paths: UpgradePaths = UpgradePaths(),
    live: bool = True,
    ctl: Systemctl | None = systemctl,
) -> list[str]:
    """Make apt's config and timers follow prefs.auto_upgrades and prefs.upgrade_window;
    what changed, in words (empty: nothing to do). live=False (a chroot, an image
    build): files and `systemctl enable/disable` only, nothing started or reloaded.
    ctl None: no systemd here (files only)."""
    changed = [str(paths.apt_conf)] if _put(paths.apt_conf, apt_conf(prefs.auto_upgrades)) else []
    for timer, text in timer_dropins(prefs.upgrade_window).items():
        if _put(paths.dropin(timer), text):
            changed.append(str(paths.dropin(timer)))
    if ctl is None:
        return changed
    if live and changed:
        ctl("daemon-reload")
    want = "enabled" if prefs.auto_upgrades else "disabled"
    for timer in TIMERS:
        state = ctl("is-enabled", timer).stdout.strip()
        if state == want or state in ("masked", ""):  # masked: the owner's word; "": no such unit
            if live and changed and state == "enabled":
                ctl("restart", timer)  # a new OnCalendar takes effect now
            continue
        verb = "enable" if prefs.auto_upgrades else "disable"
        done = ctl(verb, *(["--now"] if live else []), timer)
        if done.returncode != 0:
            raise KernelError(f"systemctl {verb} {timer} failed: {done.stderr.strip()}")
        log.info("%sd %s", verb, timer)
        changed.append(f"{timer} {want}")
    return changed


def remove(paths: UpgradePaths = UpgradePaths(), live: bool = True) -> list[str]:
    """Take meshpi's config out again (install.sh --uninstall): Debian's own stays."""
    removed = []
    for path in (paths.apt_conf, *(paths.dropin(t) for t in TIMERS)):
        if path.exists():
            path.unlink()
            log.info("removed %s", path)
            removed.append(str(path))
            if path.parent.name.endswith(".timer.d"):
                with contextlib.suppress(OSError):  # not empty: someone else's drop-ins stay
                    path.parent.rmdir()
    if removed and live and shutil.which("systemctl"):
        systemctl("daemon-reload")
    return removed


# -- apt's hooks ---------------------------------------------------------------


def hook_pre(text: str, paths: UpgradePaths = UpgradePaths()) -> tuple[PackageChange, ...]:
    """Before dpkg runs: remember what apt is about to install or upgrade."""
    changes = parse_hook_v2(text)
    if changes:
        paths.pending.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        doc = [{"name": c.name, "from": c.old, "to": c.new} for c in changes]
        atomic_write(paths.pending, json.dumps(doc) + "\n", 0o644)
    return changes


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    """dpkg's view of what is installed now (packages that are fully installed)."""
    if not names:
        return {}
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *names],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].startswith("ii"):
            found[parts[0]] = parts[1]
    return found


def hook_post(
    paths: UpgradePaths = UpgradePaths(),
    now: float | None = None,
    versions: Callable[[Sequence[str]], dict[str, str]] = installed_versions,
) -> Record | None:
    """After dpkg ran: log what really got installed (dpkg's word, not apt's plan),
    and mark a reboot when the kernel or libc was among it."""
    try:
        planned = json.loads(paths.pending.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): nothing logged", paths.pending, e)
        paths.pending.unlink(missing_ok=True)
        return None
    paths.pending.unlink(missing_ok=True)
    try:
        changes = [PackageChange(str(p["name"]), p["from"], str(p["to"])) for p in planned]
    except (TypeError, KeyError) as e:
        log.warning("%s holds no package list (%s): nothing logged", paths.pending, e)
        return None
    now_installed = versions([c.name for c in changes])
    done = tuple(c for c in changes if now_installed.get(c.name) == c.new)
    if not done:
        return None
    record = Record(time.time() if now is None else now, done, needs_reboot(c.name for c in done))
    try:
        old = paths.log.read_text(errors="replace")
    except FileNotFoundError:
        old = ""
    paths.log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(paths.log, append_record(old, record), 0o644)
    log.info("upgraded %s", ", ".join(f"{c.name} {c.old or '-'} -> {c.new}" for c in done))
    if record.reboot:
        mark_reboot(record.reboot, paths)
    return record


def mark_reboot(packages: Sequence[str], paths: UpgradePaths = UpgradePaths()) -> None:
    """/run/reboot-required (+ .pkgs), the files Debian's kernel hook and
    unattended-upgrades' Automatic-Reboot use."""
    pkgs = paths.reboot_required.with_name(paths.reboot_required.name + ".pkgs")
    try:
        known = pkgs.read_text().split()
    except FileNotFoundError:
        known = []
    paths.reboot_required.write_text("*** System restart required ***\n")
    atomic_write(pkgs, "".join(f"{n}\n" for n in dict.fromkeys([*known, *packages])), 0o644)
    log.info("a reboot is due for %s", ", ".join(packages))


def read_hook_input(stream: Any) -> str:
    """All of apt's input (apt blocks if a hook leaves it unread), at most HOOK_INPUT_MAX kept."""
    data = stream.read(HOOK_INPUT_MAX)
    while stream.read(1 << 16):  # drain the rest
        pass
    if len(data) >= HOOK_INPUT_MAX:
        raise HookInputError(f"apt hook input is larger than {HOOK_INPUT_MAX} bytes")
    return str(data.decode(errors="replace") if isinstance(data, bytes) else data)


# -- status --------------------------------------------------------------------


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _tail(path: Path) -> list[str]:
    """The last TAIL_BYTES of the log, whole lines only (a file of any size is fine)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except FileNotFoundError:
        return []
    lines = data.decode(errors="replace").splitlines()
    return lines[1:] if size > TAIL_BYTES else lines


def read_status(prefs: Prefs, paths: UpgradePaths = UpgradePaths()) -> dict[str, Any]:
    """The `upgrades` object of the LocalAPI's status; never raises for a bad file."""
    pkgs = paths.reboot_required.with_name(paths.reboot_required.name + ".pkgs")
    reboot_for: list[str] = []
    with contextlib.suppress(OSError), pkgs.open("rb") as f:
        reboot_for = [n for n in f.read(4096).decode(errors="replace").split() if n.isprintable()][:20]
    try:
        tail = _tail(paths.log)
        error = None
    except OSError as e:
        tail, error = [], f"{paths.log}: cannot be read: {e.strerror}"
    # apt.systemd.daily touches update-stamp after a successful `apt-get update`
    # (update-success-stamp: the same, where update-notifier is installed)
    checked = [_mtime(paths.stamps / name) for name in ("update-stamp", "update-success-stamp")]
    status = upgrades_status(
        enabled=prefs.auto_upgrades,
        window=prefs.upgrade_window,
        last_checked=max((t for t in checked if t is not None), default=None),
        last_run=_mtime(paths.stamps / "unattended-upgrades-stamp"),
        log_tail=tail,
        reboot_required=paths.reboot_required.exists(),
        reboot_for=reboot_for,
        log_name=str(paths.log),
    )
    if error is not None:
        status["error"] = error
    return status

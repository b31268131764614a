"""Installing a checked bundle beside the running version, switching to it in one
rename, and switching back when the new version is not healthy in time.

    /opt/meshpi-versions/<version>/   one venv per version (the image's first: `factory`)
    /opt/meshpi -> /opt/meshpi-versions/<version>   what the units run (/opt/meshpi/bin/…)

A venv is not relocatable (its scripts name their own interpreter), so a version
is built where it will live and marked complete (`.meshpi-complete`) last; a
directory without the mark is what a power cut left and is built again. The
switch is a symlink renamed over the old one: a reader sees the old version or
the new one. Versions other than the running one and the one before it are
removed after a switch, so there is always exactly one to roll back to.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.base.files import atomic_write, fsync_dir
from appliance.update.bundle import BundleError, Manifest, Version

log = logging.getLogger(__name__)

COMPLETE = ".meshpi-complete"
_METADATA_VERSION = re.compile(r"^Version: (\S+)$", re.MULTILINE)


class InstallError(BundleError):
    """The bundle was fine; building its venv failed (nothing was switched)."""


@dataclass(frozen=True)
class Layout:
    versions: Path  # /opt/meshpi-versions
    current: Path  # /opt/meshpi, a symlink into versions/
    python: str = sys.executable if sys.prefix == sys.base_prefix else "python3"

    def running(self) -> Path | None:
        """The version directory `current` points at (None: not a symlink yet)."""
        if not self.current.is_symlink():
            return None
        return self.versions / Path(os.readlink(self.current)).name

    def running_version(self) -> Version | None:
        target = self.running() if self.current.is_symlink() else self.current
        return None if target is None else venv_version(target)


def venv_version(venv: Path) -> Version | None:
    """meshpi's version in a venv, from its installed metadata (no code run)."""
    for meta in sorted(venv.glob("lib/python3*/site-packages/meshpi-*.dist-info/METADATA")):
        found = _METADATA_VERSION.search(meta.read_text(errors="replace"))
        if found:
            try:
                return Version.parse(found.group(1))
            except BundleError:
                return None  # a development version (0.1.0.dev…): any release is newer
    return None


def install(layout: Layout, staging: Path, manifest: Manifest) -> Path:
    """Build the venv of `manifest`'s version from the wheels in `staging`; its
    directory, complete. The running version is never touched."""
    target = layout.versions / str(manifest.version)
    if target == layout.running():
        raise InstallError(f"version {manifest.version} is the running version")
    if (target / COMPLETE).exists():
        log.info("update: %s is already installed (kept from before)", target)
        return target
    if target.exists():
        shutil.rmtree(target)  # half built: a crash or a power cut during an earlier try
    layout.versions.mkdir(parents=True, exist_ok=True)
    wheels = [str(staging / Path(f.name).name) for f in manifest.files]
    log.info("update: installing %d wheels into %s", len(wheels), target)
    _make_venv(layout, target)
    pip = [str(target / "bin/python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "install", "--quiet", "--no-index", "--no-deps", "--no-cache-dir", *wheels], "installing")
    _run([*pip, "check"], "checking the dependencies")
    _run([str(target / "bin/meshpi"), "--help"], "running meshpi --help")
    imports = "import appliance.agent.loop, appliance.control.app, webui.server"
    _run([str(target / "bin/python"), "-c", imports], "importing the agent, control and the web UI")
    if venv_version(target) != manifest.version:
        raise InstallError(f"the bundle's meshpi wheel is not version {manifest.version}")
    atomic_write(target / COMPLETE, f"{manifest.version}\n")
    return target


def _make_venv(layout: Layout, target: Path) -> None:
    """A venv with pip at `target`. pip is copied from the running version when that
    has one for the same Python: ensurepip installs and compiles it afresh, which
    was 38-54 s of a 200 s update under emulation (6 s against 0.2 s on a PC)."""
    _run([layout.python, "-m", "venv", "--without-pip", str(target)], "making the venv")
    (site,) = target.glob("lib/python3*/site-packages")
    running = layout.running()
    if running is not None and _copy_pip(running / site.relative_to(target), site):
        log.info("update: pip copied from %s", running.name)
        return
    _run([str(target / "bin/python"), "-m", "ensurepip", "--default-pip"], "installing pip (ensurepip)")


def _copy_pip(source: Path, site: Path) -> bool:
    """pip and its metadata from `source` (site-packages) into `site`; False if it has none."""
    infos = sorted(source.glob("pip-*.dist-info"))
    if not (source / "pip/__init__.py").is_file() or len(infos) != 1:
        return False
    # copy2 keeps the mtimes the bytecode's headers name: the copy's .pyc files stay valid.
    shutil.copytree(source / "pip", site / "pip", symlinks=True)
    shutil.copytree(infos[0], site / infos[0].name, symlinks=True)
    return True


def _run(cmd: list[str], what: str) -> None:
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        gist = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise InstallError(f"{what} failed (exit {done.returncode}): {' / '.join(gist)}")
    log.info("update: %s took %.1f s", what, time.monotonic() - t0)


def switch(layout: Layout, target: Path) -> Path | None:
    """Point `current` at `target` in one rename; the version it pointed at before."""
    previous = layout.running()
    if not (target / COMPLETE).exists() and target.name != "factory":
        raise InstallError(f"{target} is not a complete version")
    tmp = layout.current.with_name(f".{layout.current.name}.switch")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(target, layout.current.parent))  # as the image's: relative
    os.replace(tmp, layout.current)
    fsync_dir(layout.current.parent)
    log.info(
        "update: %s now runs %s (was %s)", layout.current, target.name, previous.name if previous else "-"
    )
    return previous


def prune(layout: Layout, keep: Path | None) -> list[str]:
    """Remove every version but the running one and `keep` (the one to roll back to)."""
    running = layout.running()
    removed = []
    for d in sorted(layout.versions.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and d not in (running, keep):
            shutil.rmtree(d)
            removed.append(d.name)
    if removed:
        log.info("update: removed old versions %s", ", ".join(removed))
    return removed

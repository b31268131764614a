"""Run meshpi's Python as another user, from any clone.

Tests that drop privileges (`setpriv --reuid nobody …`) cannot run the checkout's
`.venv` when the clone lives in a directory that user may not enter: Debian 12 makes
home directories 0700, so `sudo ./scripts/test` from `~/meshpi` failed there. So they
run a copy made readable for the purpose, under /tmp:

    <tmp>/venv       a venv of Debian's /usr/bin/python3 (no pip), whose site-packages
                     holds the checkout's venv's packages (hard links where the file
                     system allows, else copies; the big development-only ones left
                     out) and a plain copy of `appliance` and `webui` (not the editable
                     install, which points back into the clone)

Made once per test process and removed at its exit. `python()` is its interpreter;
run programs as `python -m webui.server …`, `python -m appliance.cli …`.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "webui")
# Development tools the programs never import: not worth linking or copying.
LEFT_OUT = ("playwright", "mypy", "mypyc", "ruff", "pip", "pygments", "PIL", "pillow", "zxingcpp", "_pytest",
            "pytest", "hypothesis", "__editable__", "meshpi-", "distutils-precedence")  # fmt: skip
READABLE = stat.S_IRGRP | stat.S_IROTH


def _left_out(name: str) -> bool:
    return name.startswith(LEFT_OUT) or "__mypyc" in name


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or a protected hard link
        shutil.copy2(src, dst)


def _open_up(root: Path) -> None:
    """Directories 0755, files at least 0644 (executables 0755): readable by anyone."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if stat.S_ISREG(mode) and mode & READABLE != READABLE:
                path.chmod(stat.S_IMODE(mode) | READABLE | (0o055 if mode & stat.S_IXUSR else 0))


@functools.cache
def runtime() -> Path:
    """The readable copy's root (made on first use, removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="meshpi-unprivileged-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    venv = root / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    theirs = Path(sysconfig.get_path("purelib"))  # the checkout's .venv (this interpreter's)
    ours = next((venv / "lib").glob("python3*/site-packages"))
    for entry in theirs.iterdir():
        if _left_out(entry.name) or entry.name == "__pycache__":
            continue
        if entry.is_dir():
            shutil.copytree(entry, ours / entry.name, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            _link_or_copy(str(entry), str(ours / entry.name))
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, ours / package, ignore=shutil.ignore_patterns("__pycache__"))
    _open_up(root)
    return root


def python() -> Path:
    """An interpreter any user can run, that imports meshpi and its dependencies."""
    return runtime() / "venv" / "bin" / "python"


def check() -> None:
    """Fail loudly (never skip) when the copy does not work for an unprivileged user."""
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python()),
                           "-c", "import webui.server, appliance.client.localapi"],
                          capture_output=True, text=True, cwd="/", timeout=60)  # fmt: skip
    assert done.returncode == 0, f"nobody cannot run {python()}: {done.stderr[-500:]}"


if __name__ == "__main__":
    print(python())
    check()
    sys.exit(0)

"""Check, on the build host, that every Python module in the image has bytecode the
image's Python will use as it is: a __pycache__/<name>.cpython-3XX.pyc whose header
matches the source's mtime and size (or a hash-checked one). Otherwise the Pi
compiles at every start (the units' file systems are read-only: the result is
never kept), which costs seconds of boot under emulation and on a Pi Zero 2 W.

    python3 image/check-bytecode.py ROOTFS [DIR...]     (DIRs inside ROOTFS)

Prints one line, "N modules with valid bytecode (cpython-3XX)"; exit 1 and the first
offenders when any is missing or stale. Runs with the host's Python (any 3.x): it
reads headers, it does not import the bytecode.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

DEFAULT_DIRS = ("/opt/meshpi-versions", "/usr/lib/python3", "/usr/lib/python3.13")
SKIP_PARTS = {"__pycache__", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}


def source_stat(rootfs: Path, path: Path) -> os.stat_result:
    """stat() of a source inside the rootfs, following absolute links inside it."""
    for _ in range(10):
        if not path.is_symlink():
            return path.stat()
        target = Path(os.readlink(path))
        path = rootfs / target.relative_to("/") if target.is_absolute() else path.parent / target
    return path.stat()


def main() -> int:
    rootfs = Path(sys.argv[1])
    dirs = sys.argv[2:] or list(DEFAULT_DIRS)
    tags = {p.name.rsplit(".", 2)[-2] for p in (rootfs / "usr/lib").glob("python3.*/__pycache__/os.*.pyc")}
    if len(tags) != 1:
        print(f"check-bytecode: cannot tell the image's Python from {sorted(tags)}")
        return 1
    tag = tags.pop()
    good, bad = 0, []
    for top in dirs:
        base = rootfs / top.lstrip("/")
        for folder, subdirs, files in os.walk(base):
            subdirs[:] = [d for d in subdirs if d not in SKIP_PARTS]
            for name in files:
                if not name.endswith(".py"):
                    continue
                source = Path(folder) / name
                pyc = Path(folder) / "__pycache__" / f"{name[:-3]}.{tag}.pyc"
                try:
                    header = pyc.read_bytes()[:16]
                    st = source_stat(rootfs, source)
                except FileNotFoundError:
                    bad.append(f"missing: {pyc.relative_to(rootfs)}")
                    continue
                _magic, flags, mtime, size = struct.unpack("<4sIII", header)
                hash_based = flags & 1
                if hash_based or (mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF):
                    good += 1
                else:
                    bad.append(f"stale: {pyc.relative_to(rootfs)}")
    if bad:
        print(f"check-bytecode: {len(bad)} modules without valid bytecode ({tag}), e.g.:")
        print("\n".join(f"  {line}" for line in bad[:10]))
        return 1
    print(f"{good} modules with valid bytecode ({tag})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

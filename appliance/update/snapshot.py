"""meshpi's state as the previous version left it, kept through an update, so that
a rollback gives the old code back the state it can read.

A new version may write its state in a form the old one cannot read: control's
database migrated to a newer schema (the old control then refuses it, as it must),
a prefs field the old parser does not know. Switching the code back alone would
leave the old version unable to start. So the update stops meshpi, copies each
state directory beside itself (`cp -a`: owners, modes, a DynamicUser's private
directory), and starts the new version; a rollback stops it, puts the copies back
in one rename each, and starts the old version. What the new version wrote during
its trial (seconds) goes with the rollback; nothing from before the update does.

The copies are made with meshpi stopped, so a database is never copied mid-write.
A copy left by a power cut is replaced by the next update's.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.base.files import fsync_dir

log = logging.getLogger(__name__)

# The agent's, control's (DynamicUser: the real directory is under private/) and the
# dashboard's. A directory that is not there (control on a joining node) is skipped.
STATE_DIRS = (Path("/var/lib/meshpi"), Path("/var/lib/private/meshpi-control"), Path("/var/lib/meshpi-web"))
SUFFIX = ".before-update"
FAILED = ".failed-update"


class SnapshotError(Exception):
    pass


@dataclass(frozen=True)
class Snapshot:
    dirs: tuple[Path, ...]

    def kept(self, live: Path) -> Path:
        return live.with_name(live.name + SUFFIX)

    def take(self) -> list[Path]:
        """Copy every state directory that exists beside itself; the ones copied."""
        taken = []
        for live in self.dirs:
            copy = self.kept(live)
            if copy.exists():
                shutil.rmtree(copy)  # a power cut's leftover, or the last update's
            if not live.is_dir():
                continue
            done = subprocess.run(["cp", "-a", str(live), str(copy)], capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(copy, ignore_errors=True)
                raise SnapshotError(f"cannot keep a copy of {live}: {done.stderr.strip()}")
            fsync_dir(copy.parent)
            taken.append(live)
        return taken

    def restore(self) -> list[Path]:
        """Put each copy back in place of what the new version left (meshpi stopped)."""
        restored = []
        for live in self.dirs:
            copy = self.kept(live)
            if not copy.is_dir():
                continue
            failed = live.with_name(live.name + FAILED)
            if failed.exists():
                shutil.rmtree(failed)
            if live.exists():
                live.rename(failed)
            copy.rename(live)
            fsync_dir(live.parent)
            shutil.rmtree(failed, ignore_errors=True)
            restored.append(live)
        return restored

    def drop(self) -> None:
        """The new version is healthy: the copies are not needed any more."""
        for live in self.dirs:
            shutil.rmtree(self.kept(live), ignore_errors=True)

"""The agent's state directory (/var/lib/meshpi): the one place that names its files.

- node.key       WireGuard private key, mode 0600, made here and never sent anywhere
- node.key.next  the key a rotation moves to, until control has accepted it
- machine.key    X25519 key that seals control requests, mode 0600, never sent anywhere
- owned.json     which interface/table/fwmark/backend meshpi took, so `meshpi down`
                 removes exactly that even after prefs changed or the agent crashed
- agent.pid      the running agent, held under an exclusive lock
- prefs.json     what the owner chose (`meshpi up/set`, the dashboard)
- login.json     the control server's login URL (and a pre-auth key until used), 0600
- control.json   control's pinned public key (trust on first use)
- netmap.json    the last netmap, a snapshot for the next start (written coalesced)
- devices.json   the phones this node hosts (public keys only)
- firstboot.json what first boot did with meshpi.toml (written by meshpi-firstboot)
- hostdns.json   the host's DNS as it was before meshpi (resolv.conf's bytes, or
                 resolved's link), so `meshpi down` restores it even after a crash
- upgrades.log   what Debian's unattended upgrades installed, one JSON line per dpkg run,
                 bounded (written by apt's hooks: meshpi-upgrades, kernel/upgrades.py)

Everything here is a snapshot for the next start; at run time the agent's
threads hand each other typed updates in memory (bus.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from appliance.base.defaults import DEFAULT_STATE_DIR as DEFAULT_STATE_DIR
from appliance.base.files import atomic_write, fsync_dir, remove_partial_writes
from appliance.base.keys import PrivateKey
from appliance.core.model import Scope
from appliance.wire.seal import MachineKey

log = logging.getLogger(__name__)


class StateDirError(Exception):
    """The state directory holds something unusable; the message says what and where."""


class AgentRunning(StateDirError):
    pass


@dataclass(frozen=True)
class Owned:
    scope: Scope
    backend: str


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[str] | None = None

    def ensure(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def prefs_file(self) -> Path:
        return self.path / "prefs.json"

    @property
    def login_file(self) -> Path:
        return self.path / "login.json"

    @property
    def control_pin_file(self) -> Path:
        return self.path / "control.json"

    @property
    def netmap_file(self) -> Path:
        return self.path / "netmap.json"

    @property
    def hostdns_file(self) -> Path:
        return self.path / "hostdns.json"

    @property
    def devices_file(self) -> Path:
        return self.path / "devices.json"

    @property
    def firstboot_file(self) -> Path:
        return self.path / "firstboot.json"

    @property
    def upgrades_file(self) -> Path:
        return self.path / "upgrades.log"

    @property
    def traffic_file(self) -> Path:
        """Bytes per minute of the last day (agent/traffic.py), for the next start."""
        return self.path / "traffic.json"

    # -- the node key ----------------------------------------------------------

    @property
    def key_file(self) -> Path:
        return self.path / "node.key"

    @property
    def next_key_file(self) -> Path:
        return self.path / "node.key.next"

    def node_key(self) -> PrivateKey:
        """Load the node key, making one on first use."""
        return self._wireguard_key(self.key_file)

    def next_node_key(self) -> PrivateKey:
        """The key a rotation moves to, made once: a rotation cut short by a crash
        resumes with the same key, which control may already have."""
        return self._wireguard_key(self.next_key_file)

    def rotation_pending(self) -> bool:
        return self.next_key_file.exists()

    def commit_node_key(self) -> None:
        """Control has the next key: it becomes the node key (one rename, so a
        crash leaves either the old key and a pending rotation, or the new key)."""
        os.replace(self.next_key_file, self.key_file)
        fsync_dir(self.path)

    def _wireguard_key(self, path: Path) -> PrivateKey:
        self.ensure()
        try:
            text = path.read_text()
        except FileNotFoundError:
            key = PrivateKey.generate()
            atomic_write(path, key.secret_base64() + "\n", mode=0o600)
            log.info("made a new node key in %s (public key %s)", path, key.public_key())
            return key
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; made it 0600", path)
        try:
            return PrivateKey.from_base64(text)
        except ValueError as e:
            # Never overwrite a key silently: the node's identity would change.
            raise StateDirError(
                f"{path}: not a WireGuard private key ({e}); move it away to make a new identity"
            ) from None

    # -- the machine key (who this node is to control) ---------------------------

    @property
    def machine_key_file(self) -> Path:
        return self.path / "machine.key"

    def machine_key(self) -> MachineKey:
        """Load the machine key, making one on first use."""
        self.ensure()
        path = self.machine_key_file
        try:
            text = path.read_text()
        except FileNotFoundError:
            key = MachineKey.generate()
            atomic_write(path, key.secret_text() + "\n", mode=0o600)
            log.info("made a new machine key in %s (public key %s)", path, key.public_key())
            return key
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by others; made it 0600", path)
        try:
            return MachineKey.from_text(text)
        except ValueError as e:
            # Never overwrite it silently: control would see a new machine.
            raise StateDirError(
                f"{path}: not a machine key ({e}); move it away to make a new identity "
                "(control will then see a new machine)"
            ) from None

    # -- what meshpi owns in the kernel ----------------------------------------

    @property
    def owned_file(self) -> Path:
        return self.path / "owned.json"

    def record_owned(self, owned: Owned) -> None:
        s = owned.scope
        record = {
            "interface": s.interface,
            "table": s.table,
            "fwmark": s.fwmark,
            "backend": owned.backend,
        }
        if self.owned() != owned:
            atomic_write(self.owned_file, json.dumps(record) + "\n")

    def owned(self) -> Owned | None:
        try:
            record = json.loads(self.owned_file.read_text())
            scope = Scope(str(record["interface"]), int(record["table"]), int(record["fwmark"]))
            return Owned(scope, str(record["backend"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise StateDirError(f"{self.owned_file}: unreadable ({e})") from None

    def forget_owned(self) -> None:
        self.owned_file.unlink(missing_ok=True)

    # -- one agent at a time ---------------------------------------------------

    @property
    def pid_file(self) -> Path:
        return self.path / "agent.pid"

    def lock(self) -> None:
        """Take the agent lock, or raise AgentRunning naming the holder."""
        self.ensure()
        f = open(self.pid_file, "a+")  # noqa: SIM115 - held for the agent's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise AgentRunning(
                    f"an agent already runs for {self.path} (pid {self.running_pid()})"
                ) from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f
        for path in remove_partial_writes(self.path):
            log.info("removed %s: a write cut short by a crash or power loss", path.name)

    def running_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def agent_running(self) -> bool:
        """Does an agent hold the lock on this state directory?"""
        if not self.pid_file.exists():
            return False
        with open(self.pid_file) as f:
            return not _try_lock(f)

    def stop_running_agent(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the agent holding the lock and wait until it has let go."""
        if not self.pid_file.exists():
            return None
        with open(self.pid_file) as f:
            if _try_lock(f):
                return None  # nobody holds it
            pid = self.running_pid()
            if pid is None:
                return None
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not _try_lock(f):
                if time.monotonic() > deadline:
                    raise AgentRunning(f"agent pid {pid} did not stop within {timeout:.0f} s")
                time.sleep(0.05)
            return pid


def _try_lock(f: IO[str]) -> bool:
    """Take the agent lock if nobody holds it; False if someone does."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True

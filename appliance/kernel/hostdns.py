"""Point the host's DNS at the mesh's resolver, and put back exactly what was there.

Two backends, chosen the way Tailscale's `net/dns` does it:
- systemd-resolved, when it runs and /etc/resolv.conf is its file (a symlink
  into /run/systemd/resolve/, or its stub 127.0.0.53): per-link DNS servers and
  domains on the mesh interface (kernel/resolved.py). Nothing on disk changes;
  resolved forgets the settings when the link goes.
- otherwise a managed resolv.conf, as wg-quick and tailscale's "direct" mode do:
  the file is replaced (a symlink too: the link itself, not what it points at).

Before the first change the original is saved atomically in the state directory
(`saved`): the backend, the file's bytes, mode and owner or its symlink target
(or that there was none), and the host's own resolvers. So a restart after a
crash (kill -9, power loss) finds it and carries on, and `meshpi down` without an
agent puts back byte for byte what was there. A file the host rewrote while
meshpi managed it (a DHCP client) becomes the new original: that is what the
host wants back, and it is never overwritten by a stale copy.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from appliance.base.files import atomic_write, fsync_dir
from appliance.base.net import IPAddress
from appliance.core.hostdns import HostDnsConfig, is_ours, parse_nameservers, render_resolv_conf
from appliance.kernel.base import KernelError
from appliance.kernel.resolved import RESOLVED_STUB_DIR, Resolved

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_STUB = ip_address("127.0.0.53")
NAMED_NETNS = Path("/run/netns")  # `ip netns add` names namespaces here


def in_other_netns(proc: Path = Path("/proc")) -> bool:
    """Does this process run in a network namespace that is not the host's (a
    lab node under `ip netns exec`, a test)? Then /etc/resolv.conf is the host's
    file, not this namespace's, and is never ours to change."""
    try:
        ours = os.stat(proc / "self/ns/net")
    except OSError:
        return False
    try:
        host = os.stat(proc / "1/ns/net")
        if (host.st_dev, host.st_ino) != (ours.st_dev, ours.st_ino):
            return True
    except OSError:
        pass  # without CAP_SYS_PTRACE (the image's sandbox) PID 1's namespace is hidden
    try:
        named = list(NAMED_NETNS.iterdir())
    except OSError:
        return False
    for path in named:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            return True
    return False


class HostDnsError(KernelError):
    """The host's DNS settings could not be read, changed or restored."""


@dataclass(frozen=True)
class Original:
    """A resolv.conf as it was: a file (bytes, mode, owner), a symlink, or nothing."""

    kind: str  # "file" | "symlink" | "absent"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "data": base64.b64encode(self.data).decode(), "mode": self.mode,
                "uid": self.uid, "gid": self.gid, "target": self.target}  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Original:
        return cls(str(obj["kind"]), base64.b64decode(obj["data"]), int(obj["mode"]), int(obj["uid"]),
                   int(obj["gid"]), str(obj["target"]))  # fmt: skip

    def content(self, path: Path) -> bytes:
        """What a reader of the file sees (through a symlink: the target's bytes)."""
        if self.kind == "file":
            return self.data
        if self.kind == "symlink":
            try:
                return path.read_bytes()
            except OSError:
                return b""
        return b""


def read_original(path: Path) -> Original:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Original("absent")
    except OSError as e:
        raise HostDnsError(f"{path}: cannot read it ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        return Original("symlink", target=os.readlink(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HostDnsError(f"{path}: cannot read it ({e.strerror})") from None
    return Original("file", data, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def put_back(path: Path, original: Original) -> None:
    """Atomically: a reader sees the managed file or the original, nothing between."""
    try:
        if original.kind == "absent":
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        elif original.kind == "symlink":
            tmp = path.with_name(f".{path.name}.meshpi-link")
            tmp.unlink(missing_ok=True)
            os.symlink(original.target, tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        elif write_file(path, original.data, original.mode):
            os.chown(path, original.uid, original.gid)
    except OSError as e:
        raise HostDnsError(f"{path}: cannot restore it ({e.strerror})") from None


def write_file(path: Path, data: bytes, mode: int) -> bool:
    """Atomically (True) where the directory can be written; else in place (False),
    as resolvconf does: a file bind-mounted into a read-only /etc (a container's
    resolv.conf, or the agent's sandbox, ReadWritePaths=-/etc/resolv.conf) can be
    written but not renamed over. A symlink is never written through."""
    try:
        atomic_write(path, data, mode)
        return True
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EBUSY, errno.EACCES, errno.EPERM) or path.is_symlink():
            raise
        if not path.is_file():
            raise
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return False


@dataclass
class Saved:
    """The state directory's record (hostdns.json)."""

    backend: str  # "resolv.conf" | "resolved"
    path: str = ""  # the resolv.conf managed
    interface: str = ""  # the link resolved was told about
    original: Original = field(default_factory=lambda: Original("absent"))
    servers: tuple[IPAddress, ...] = ()  # the host's own resolvers before meshpi

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": self.path, "interface": self.interface,
                "original": self.original.to_json(), "servers": [str(s) for s in self.servers]}  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Saved:
        return cls(str(obj["backend"]), str(obj["path"]), str(obj["interface"]),
                   Original.from_json(obj["original"]),
                   tuple(ip_address(s) for s in obj["servers"]))  # fmt: skip


class HostDns:
    """apply() and restore() are idempotent and safe to call from a fresh process
    after a crash; each change to the host is logged once."""

    def __init__(
        self, saved: Path, resolv_conf: Path = RESOLV_CONF, resolved: Resolved | None = None
    ) -> None:
        self.saved_path, self.resolv_conf = saved, resolv_conf
        self.resolved = resolved if resolved is not None else Resolved()
        self._applied: tuple[HostDnsConfig, int] | None = None  # resolved: the config and the link's index
        self._confined: bool | None = None  # in a namespace of its own, with the host's resolv.conf

    # -- the record in the state directory ---------------------------------------------

    def _load(self) -> Saved | None:
        try:
            return Saved.from_json(json.loads(self.saved_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A broken record is never a reason to touch the host's file: drop it.
            log.error("%s: unreadable (%s); forgetting it, the host's DNS stays as it is", self.saved_path, e)
            self.saved_path.unlink(missing_ok=True)
            return None

    def _save(self, saved: Saved) -> None:
        atomic_write(self.saved_path, json.dumps(saved.to_json(), indent=2) + "\n", 0o600)

    # -- the contract ---------------------------------------------------------------------

    def backend(self) -> str:
        """Which backend apply() uses now: resolved when it runs and owns the
        default resolv.conf; the managed file anywhere else (a lab namespace's own)."""
        if self.resolv_conf != RESOLV_CONF or not self.resolved.running():
            return "resolv.conf"
        current = read_original(self.resolv_conf)
        if current.kind == "symlink":
            target = (self.resolv_conf.parent / current.target).resolve()
            return "resolved" if str(target).startswith(str(RESOLVED_STUB_DIR)) else "resolv.conf"
        return "resolved" if parse_nameservers(current.data) == (RESOLVED_STUB,) else "resolv.conf"

    def confined(self) -> bool:
        """True when apply() leaves the host alone: the default file, but another
        network namespace than the host's (the lab passes --resolv-conf)."""
        if self._confined is None:
            self._confined = self.resolv_conf == RESOLV_CONF and in_other_netns()
            if self._confined:
                log.warning("host DNS: this is not the host's network namespace, so %s is not this node's "
                            "to change; left alone (agent --resolv-conf names the namespace's own)",
                            self.resolv_conf)  # fmt: skip
        return self._confined

    def apply(self, cfg: HostDnsConfig) -> None:
        if self.confined():
            return
        backend = self.backend()
        saved = self._load()
        if saved is not None and saved.backend != backend:
            self.restore()  # the host moved between backends (resolved started or stopped)
            saved = None
        if backend == "resolved":
            self._apply_resolved(cfg, saved)
        else:
            self._apply_file(cfg, saved)

    def restore(self) -> None:
        saved = self._load()
        self._applied = None
        if saved is None:
            return
        if saved.backend == "resolved":
            if self.resolved.revert(saved.interface):
                log.info("host DNS: systemd-resolved forgot %s's DNS servers and domains", saved.interface)
        else:
            self._restore_file(Path(saved.path), saved.original)
        self.saved_path.unlink(missing_ok=True)
        fsync_dir(self.saved_path.parent)

    def original_servers(self) -> tuple[IPAddress, ...]:
        """The host's own resolvers, as they were before meshpi changed anything."""
        saved = self._load()
        if saved is not None:
            return saved.servers
        if self.backend() == "resolved":
            return self.resolved.upstreams()
        current = read_original(self.resolv_conf)
        text = current.content(self.resolv_conf)
        return () if is_ours(text) else parse_nameservers(text)

    # -- resolv.conf ------------------------------------------------------------------------

    def _apply_file(self, cfg: HostDnsConfig, saved: Saved | None) -> None:
        path = self.resolv_conf
        current = read_original(path)
        wanted = render_resolv_conf(cfg).encode()
        managed = current.kind == "file" and is_ours(current.data)
        if saved is None or Path(saved.path) != path:
            if saved is not None:
                self.restore()
            if managed:
                # Ours, yet no record of the original (the state directory was wiped):
                # the best we can restore is "no file", which glibc reads as localhost.
                log.warning("host DNS: %s is meshpi's but the original is not saved; `down` removes it", path)
                current = Original("absent")
            saved = Saved("resolv.conf", str(path), original=current,
                          servers=parse_nameservers(current.content(path)))  # fmt: skip
            self._save(saved)
        elif not managed and current != saved.original:
            log.warning("host DNS: something else rewrote %s; that is now the original to restore", path)
            saved.original, saved.servers = current, parse_nameservers(current.content(path))
            self._save(saved)
        if current.kind == "file" and current.data == wanted:
            return
        if not path.parent.is_dir():
            raise HostDnsError(f"{path}: its directory {path.parent} does not exist")
        try:
            write_file(path, wanted, 0o644)
        except OSError as e:
            raise HostDnsError(f"{path}: cannot write it ({e.strerror})") from None
        was, now = ", ".join(map(str, saved.servers)) or "none", ", ".join(map(str, cfg.servers))
        search = cfg.domains[0] if cfg.domains else "-"
        log.info("host DNS: %s now asks %s (search %s); it asked %s", path, now, search, was)

    def _restore_file(self, path: Path, original: Original) -> None:
        current = read_original(path)
        if current == original:
            return
        if not (current.kind == "file" and is_ours(current.data)):
            log.warning("host DNS: %s was rewritten by something else; leaving it as it is", path)
            return
        put_back(path, original)
        what = {"file": "its original file", "symlink": f"the symlink to {original.target}",
                "absent": "no file, as before"}[original.kind]  # fmt: skip
        log.info("host DNS: %s restored (%s)", path, what)

    # -- systemd-resolved ---------------------------------------------------------------------

    def _apply_resolved(self, cfg: HostDnsConfig, saved: Saved | None) -> None:
        if saved is None or saved.interface != cfg.interface:
            if saved is not None:
                self.restore()
            upstreams = tuple(s for s in self.resolved.upstreams() if s not in cfg.servers)
            saved = Saved("resolved", interface=cfg.interface, servers=upstreams)
            self._save(saved)
        index = self.resolved.link_index(cfg.interface)
        if index is None:
            raise HostDnsError(f"host DNS: interface {cfg.interface!r} does not exist (yet)")
        if self._applied == (cfg, index):
            return
        self.resolved.set_link(cfg)
        self._applied = (cfg, index)
        log.info("host DNS: systemd-resolved asks %s on %s for %s%s",
                 ", ".join(map(str, cfg.servers)), cfg.interface, ", ".join(cfg.domains) or "no domain",
                 " and every other name (default route)" if cfg.default_route else "")  # fmt: skip

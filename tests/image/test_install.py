"""scripts/install.sh for real, in a throwaway Debian 12 chroot: install, install again
(nothing changes, and it says so), uninstall, uninstall again, purge.

The chroot is Debian bookworm (what Raspberry Pi OS bookworm is built on) for the
host's architecture, from the host's mirror with mmdebstrap, cached as a tarball in
/var/cache/meshpi-image. systemd is not PID 1 in it, so install.sh enables units
without starting them, as it does with --no-start. meshpi comes from wheels built
here from this checkout (install.sh --wheels: the chroot has no index of its own);
install.sh installs its apt packages from the mirror for real.

Runs with the image tier: MESHPI_IMAGE_TESTS=1 ./scripts/test tests/image
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MESHPI_IMAGE_CACHE", "/var/cache/meshpi-image"))
SUITE = "bookworm"
# systemd for systemctl and systemd-sysusers; the rest install.sh adds itself.
CHROOT_PACKAGES = ["systemd", "python3", "python3-venv", "ca-certificates"]
STATE_DIRS = ("var/lib/meshpi", "var/lib/meshpi-control", "var/lib/meshpi-web")
WATCHED = (
    "opt/meshpi",
    "opt/meshpi-versions",
    "etc/meshpi",
    "usr/local/lib",
    "usr/local/bin",
    "etc/systemd/system",
    "etc/passwd",
    "etc/group",
    "etc/avahi/services",
    "etc/systemd/networkd.conf.d",
)

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="builds a Debian chroot with mmdebstrap and installs into it: set MESHPI_IMAGE_TESTS=1 (as root)",
)


def _mirror() -> str:
    if os.environ.get("MESHPI_MIRROR"):
        return os.environ["MESHPI_MIRROR"].rstrip("/")
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1].rstrip("/")
    for line in Path("/etc/apt/sources.list").read_text().splitlines():
        if line.startswith("deb ") and "security" not in line:
            return line.split()[1].rstrip("/")
    raise AssertionError("no Debian mirror in /etc/apt")


def _chroot_tarball() -> Path:
    key = hashlib.sha256(f"{SUITE} {' '.join(CHROOT_PACKAGES)}".encode()).hexdigest()[:12]
    tarball = CACHE / f"install-chroot-{SUITE}-{key}.tar.zst"
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = tarball.with_suffix(".tmp.tar.zst")
        subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase",
                        f"--include={','.join(CHROOT_PACKAGES)}", SUITE, str(tmp),
                        f"deb {_mirror()} {SUITE} main"], check=True, timeout=1200)  # fmt: skip
        tmp.rename(tarball)
    return tarball


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run([str(REPO / ".venv/bin/python"), "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                    "--wheel-dir", str(out), str(REPO)], check=True, timeout=900)  # fmt: skip
    return out


class Chroot:
    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside, with /proc (systemctl and sysusers look there) in a private
        mount namespace that vanishes with the command."""
        script = 'mount -t proc proc "$1/proc" && shift && exec chroot "$@"'
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/root",
        }
        res = subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", script, "_", str(self.root),
                              str(self.root), *args], capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("/root/meshpi/scripts/install.sh", *args)

    def tree(self) -> dict[str, str]:
        """Every watched path with its mode, owner and content hash (or link target)."""
        out = {}
        for rel in WATCHED:
            top = self.root / rel
            paths = [top] if not top.is_dir() else [top, *top.rglob("*")]
            for p in paths:
                if "__pycache__" in p.parts or not (p.exists() or p.is_symlink()):
                    continue
                st = p.lstat()
                what = (
                    os.readlink(p)
                    if p.is_symlink()
                    else hashlib.sha256(p.read_bytes()).hexdigest()
                    if p.is_file()
                    else "dir"
                )
                out[str(p.relative_to(self.root))] = (
                    f"{st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_mtime_ns} {what}"
                )
        return out

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists() or (self.root / rel).is_symlink()


@pytest.fixture(scope="module")
def chroot(wheels: Path) -> Iterator[Chroot]:
    if os.geteuid() != 0:
        pytest.fail("needs root (mmdebstrap --mode=root, chroot)")
    tarball = _chroot_tarball()
    root = Path(tempfile.mkdtemp(prefix="meshpi-install-chroot-", dir="/var/tmp"))
    try:
        subprocess.run(["tar", "--zstd", "-xf", str(tarball), "-C", str(root)], check=True)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "pyproject.toml", "README.md",
                                "scripts/install.sh", "image/overlay", "appliance", "webui"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        for rel in files:
            if (REPO / rel).is_file():
                (root / "root/meshpi" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, root / "root/meshpi" / rel)
        shutil.copytree(wheels, root / "root/wheels")
        yield Chroot(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_install_help() -> None:
    res = subprocess.run([str(REPO / "scripts/install.sh"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--uninstall" in res.stdout and "--purge" in res.stdout, res


def test_install_twice_then_uninstall_in_a_debian_chroot(chroot: Chroot) -> None:
    first = chroot.install("--wheels", "/root/wheels")
    assert (
        '"changed": ["packages","venv","commands","keys","users","units","enable","upgrades"]'
        in first.stdout.splitlines()[-1]
    ), first.stdout
    assert "systemd is not running here (or --no-start): enabled, not started" in first.stdout
    for rel in ("opt/meshpi/bin/meshpi", "opt/meshpi/bin/meshpi-control", "usr/local/lib/systemd/system/meshpi-agent.service",
                "usr/local/lib/systemd/system/meshpi-control.service",
                "etc/systemd/system/multi-user.target.wants/meshpi-agent.service",
                "etc/systemd/networkd.conf.d/meshpi.conf"):  # fmt: skip
        assert chroot.exists(rel), rel
    assert not chroot.exists("etc/systemd/system/multi-user.target.wants/meshpi-control.service")
    if (REPO / "image/overlay/usr/lib/systemd/system/meshpi-password-reset.service").exists():
        assert chroot.exists("etc/systemd/system/multi-user.target.wants/meshpi-password-reset.service")
    if (REPO / "image/overlay/etc/systemd/system/meshpi-web.socket").exists():
        assert chroot.exists("etc/systemd/system/sockets.target.wants/meshpi-web.socket")
    assert chroot.run("getent", "group", "meshpi").stdout.strip().endswith(":meshpi-web")
    assert "usage: meshpi" in chroot.run("meshpi", "--help").stdout  # on PATH (/usr/local/bin)
    assert chroot.run("readlink", "/opt/meshpi").stdout.strip() == "meshpi-versions/factory"
    # Installed with no trusted update key: every bundle is refused, and says why.
    upd = chroot.run("sh", "-c", "touch /tmp/b && meshpi-update --versions /tmp/v apply /tmp/b", check=False)
    assert upd.returncode == 1 and "no update key is trusted" in upd.stdout, upd
    assert chroot.run("dpkg-query", "-W", "-f=${Status}", "nftables").stdout == "install ok installed"
    # Debian's security updates: apt reads meshpi's origins, the timers have the window.
    dump = chroot.run("apt-config", "dump", "Unattended-Upgrade::Origins-Pattern").stdout
    assert "Debian-Security" in dump and 'label=Debian"' not in dump, dump
    assert chroot.exists("etc/systemd/system/apt-daily-upgrade.timer.d/meshpi.conf")

    before = chroot.tree()
    second = chroot.install("--wheels", "/root/wheels")
    assert "install: done     nothing changed: already installed" in second.stdout, second.stdout
    assert second.stdout.splitlines()[-1] == '{"action": "install", "changed": []}'
    assert chroot.tree() == before  # not even a timestamp

    (chroot.root / "var/lib/meshpi").mkdir(mode=0o700, exist_ok=True)
    (chroot.root / "var/lib/meshpi/node.key").write_text("kept\n")
    gone = chroot.install("--uninstall")
    assert '"changed": ["units","upgrades","venv","users"]' in gone.stdout, gone.stdout
    assert "kept /var/lib/meshpi (--purge removes it)" in gone.stdout
    for rel in ("opt/meshpi", "opt/meshpi-versions", "usr/local/bin/meshpi", "usr/local/bin/meshpi-update",
                "usr/local/lib/systemd/system/meshpi-agent.service",
                "etc/systemd/system/multi-user.target.wants/meshpi-agent.service",
                "etc/systemd/system/sockets.target.wants/meshpi-web.socket", "usr/local/lib/sysusers.d/meshpi.conf",
                "etc/systemd/system/multi-user.target.wants/meshpi-password-reset.service",
                "etc/apt/apt.conf.d/52meshpi-upgrades", "etc/systemd/system/apt-daily.timer.d",
                "etc/systemd/networkd.conf.d/meshpi.conf"):  # fmt: skip
        assert not chroot.exists(rel), rel
    assert chroot.run("getent", "group", "meshpi", check=False).returncode == 2
    assert chroot.run("getent", "passwd", "meshpi-web", check=False).returncode == 2
    assert (chroot.root / "var/lib/meshpi/node.key").read_text() == "kept\n"
    again = chroot.install("--uninstall")
    assert again.stdout.splitlines()[-1] == '{"action": "uninstall", "changed": []}', again.stdout

    chroot.install("--wheels", "/root/wheels")
    purged = chroot.install("--uninstall", "--purge")
    assert "removed /var/lib/meshpi" in purged.stdout, purged.stdout
    assert not any(chroot.exists(rel) for rel in STATE_DIRS)

"""Debian's security updates with real apt, dpkg and unattended-upgrades, in a throwaway
Debian chroot (no qemu: the install test's cached bookworm chroot), against the same
fake repository as the VM's test, served on loopback:

- meshpi-upgrades writes its config; apt then allows only the security and
  stable-updates origins, and unattended-upgrade selects the security updates and not
  the main suite's point release, which Debian's own config would take;
- apt's hooks (protocol version 2) log what dpkg installed to upgrades.log and mark a
  reboot for the "kernel"; unattended-upgrade then reboots on its own (in a chroot its
  shutdown reaches no systemd: the log line is what is checked);
- the status reader sees all of it.

Runs with the image tier: MESHPI_IMAGE_TESTS=1 ./scripts/test tests/image/test_upgrades_apt.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.test_install import Chroot, _chroot_tarball
from tests.image.test_upgrades import APT_CONFIG, MT, build_repo
from tests.lab.host import wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="builds a Debian chroot and installs packages into it: set MESHPI_IMAGE_TESTS=1 (as root)",
)
CODENAME = "bookworm"  # test_install's chroot
# meshpi's code from this checkout on the chroot's own python3 (meshpi-upgrades needs
# nothing of the venv but pynacl, from Debian, and immutables' pure-Python fallback).
WRAPPER = '#!/bin/sh\nPYTHONPATH=/root/meshpi exec python3 -m appliance.kernel.upgrades_main "$@"\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def chroot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroot]:
    if os.geteuid() != 0:
        pytest.fail("needs root (mmdebstrap --mode=root, chroot)")
    root = Path(tempfile.mkdtemp(prefix="meshpi-upgrades-chroot-", dir="/var/tmp"))
    try:
        subprocess.run(["tar", "--zstd", "-xf", str(_chroot_tarball()), "-C", str(root)], check=True)
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        c = Chroot(root)
        c.run("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
              "--no-install-recommends unattended-upgrades python3-nacl >/dev/null")  # fmt: skip
        shutil.copytree(REPO / "appliance", root / "root/meshpi/appliance",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        import immutables

        shutil.copytree(Path(immutables.__file__).parent, root / "root/meshpi/immutables",
                        ignore=shutil.ignore_patterns("*.so", "__pycache__"))  # fmt: skip
        wrapper = root / "usr/local/bin/meshpi-upgrades"
        wrapper.write_text(WRAPPER)
        wrapper.chmod(0o755)
        yield c
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def served(chroot: Chroot, tmp_path: Path) -> Iterator[int]:
    root = build_repo(tmp_path, CODENAME)
    port = _free_port()
    with open(tmp_path / "http.log", "wb") as log:
        server = subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
                                   str(port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60, "the repository", 0.2)
        mt = chroot.root / MT.lstrip("/")
        (mt / "lists/partial").mkdir(parents=True)
        (mt / "sources.list.d").mkdir()
        (mt / "apt.conf").write_text(APT_CONFIG)
        (mt / "sources.list").write_text(
            "".join(
                f"deb [trusted=yes] http://127.0.0.1:{port} {s} main\n"
                for s in (CODENAME, f"{CODENAME}-security")
            )
        )
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def _versions(chroot: Chroot) -> dict[str, str]:
    out = chroot.run("dpkg-query", "-W", "fakesec", "fakeother", "linux-image-meshpitest", check=False).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def test_upgrades_apt_selects_only_security_and_logs_what_dpkg_did(chroot: Chroot, served: int) -> None:
    apt = ["env", f"APT_CONFIG={MT}/apt.conf", "DEBIAN_FRONTEND=noninteractive"]
    assert json.loads(chroot.run("meshpi-upgrades", "configure", "--offline").stdout)["changed"]
    dump = chroot.run("apt-config", "dump", "Unattended-Upgrade::Origins-Pattern").stdout
    assert 'label=Debian"' not in dump and "Debian-Security" in dump, dump  # Debian's own list replaced

    chroot.run(*apt, "apt-get", "update", "-q")
    chroot.run(
        *apt, "apt-get", "install", "-y", "-q", "fakesec=1.0", "fakeother=1.0", "linux-image-meshpitest=1"
    )
    first = [
        json.loads(line) for line in (chroot.root / "var/lib/meshpi/upgrades.log").read_text().splitlines()
    ]
    assert {p["name"]: p["from"] for p in first[-1]["packages"]} == {
        "fakesec": None, "fakeother": None, "linux-image-meshpitest": None}  # fmt: skip
    chroot.run(
        "rm", "-f", "/run/reboot-required", "/run/reboot-required.pkgs"
    )  # (the new "kernel" marked one)

    dry = chroot.run(*apt, "unattended-upgrade", "--dry-run", "--debug")
    chosen = [line for line in dry.stdout.splitlines() if line.startswith("Packages that will be upgraded:")]
    assert chosen and set(chosen[-1].split(":", 1)[1].split()) == {"fakesec", "linux-image-meshpitest"}, (
        dry.stdout
    )
    assert _versions(chroot) == {"fakesec": "1.0", "fakeother": "1.0", "linux-image-meshpitest": "1"}

    real = chroot.run(*apt, "unattended-upgrade", "--debug", check=False)
    assert _versions(chroot) == {"fakesec": "1.1", "fakeother": "1.0", "linux-image-meshpitest": "2"}, (
        real.stdout
    )
    assert "Found /var/run/reboot-required, rebooting" in real.stdout + real.stderr, real.stdout[-3000:]
    records = [
        json.loads(line) for line in (chroot.root / "var/lib/meshpi/upgrades.log").read_text().splitlines()
    ]
    upgraded = {p["name"]: (p["from"], p["to"]) for r in records for p in r["packages"] if p["from"]}
    assert upgraded == {"fakesec": ("1.0", "1.1"), "linux-image-meshpitest": ("1", "2")}, records
    status = json.loads(chroot.run("meshpi-upgrades", "status").stdout)
    assert status["reboot_pending"] and status["reboot_for"] == ["linux-image-meshpitest"], status
    assert status["last_upgraded"]["packages"][0]["from"] is not None and status["error"] is None, status
    assert status["last_run"] is not None  # unattended-upgrade's stamp in /var/lib/apt/periodic

    # off: apt's periodic jobs stop (the timers too, where systemd runs)
    chroot.run("sh", "-c", "echo '{\"auto_upgrades\": false}' > /var/lib/meshpi/prefs.json")
    assert chroot.root.joinpath("etc/apt/apt.conf.d/52meshpi-upgrades").exists()
    chroot.run("meshpi-upgrades", "configure", "--offline")
    assert (
        'APT::Periodic::Unattended-Upgrade "0";' in chroot.run("apt-config", "dump", "APT::Periodic").stdout
    )

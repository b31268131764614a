"""Debian's security updates in the booted image (issue 15 part 1), with no internet.

    vmnet 10.99.0.1:8088   an apt repository this test builds (dpkg-deb) and serves:
      dists/<codename>            Origin Debian, Label Debian (a point release):
                                  fakesec 1.0, fakeother 1.0 + 1.1, linux-image-meshpitest 1
      dists/<codename>-security   Origin Debian, Label Debian-Security:
                                  fakesec 1.1, linux-image-meshpitest 2
    the VM                 the image's own apt config (meshpi-upgrades), plus a test
                           APT_CONFIG that points apt at that repository only, and
                           apt.conf.d/99meshpi-imagetest that keeps Automatic-Reboot off
                           (the shared VM must stay up; unattended-upgrade re-reads
                           apt.conf.d after APT_CONFIG, so only a later file there wins)

unattended-upgrade must select the two security updates and not fakeother, which
Debian's own 50unattended-upgrades would take (the main suite's origin). The real run
then goes through apt's hooks: upgrades.log, the reboot mark for the "kernel", and the
agent's status. Last, `meshpi set` moves the window and the switch: meshpi-upgrades.path
rewrites the timers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.machine import Vm
from tests.image.vmnet import VMNET_V4
from tests.lab.host import wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1", reason="boots the image under qemu: set MESHPI_IMAGE_TESTS=1"
)

PORT = 8088
MT = "/tmp/meshpi-upgrades-test"
# Package lists from this repository only.
APT_CONFIG = f"""\
Dir::Etc::sourcelist "{MT}/sources.list";
Dir::Etc::sourceparts "{MT}/sources.list.d";
Dir::State::Lists "{MT}/lists";
Acquire::Check-Valid-Until "false";
"""
NO_REBOOT = "/etc/apt/apt.conf.d/99meshpi-imagetest"
APT = f"APT_CONFIG={MT}/apt.conf"
SLOW = 900  # python-apt under full-system emulation, on a loaded 2-core host


def _deb(work: Path, pool: Path, name: str, version: str) -> Path:
    root = work / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nSection: misc\nPriority: optional\n"
        f"Maintainer: meshpi tests <tests@meshpi.invalid>\nDescription: meshpi image test package\n"
    )
    doc = root / "usr/share/doc" / name
    doc.mkdir(parents=True)
    (doc / "VERSION").write_text(version + "\n")
    out = pool / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


def _suite(repo: Path, suite: str, label: str, archive: str, debs: list[Path]) -> None:
    """dists/<suite>: a Packages index of `debs` (arch all: for the Pi's arm64 and the
    host's amd64, tests/image/test_upgrades_apt.py) and a Release naming origin and label."""
    scan = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=repo, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    stanzas = [s for s in scan.split("\n\n") if any(f"Filename: pool/{d.name}\n" in s + "\n" for d in debs)]
    assert len(stanzas) == len(debs), scan
    packages = "\n\n".join(s.strip() for s in stanzas) + "\n"
    digest = hashlib.sha256(packages.encode()).hexdigest()
    for arch in ("arm64", "amd64"):
        binary = repo / "dists" / suite / f"main/binary-{arch}"
        binary.mkdir(parents=True)
        (binary / "Packages").write_text(packages)
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(time.time() - 86400))
    (repo / "dists" / suite / "Release").write_text(
        f"Origin: Debian\nLabel: {label}\nSuite: {archive}\nCodename: {suite}\nDate: {date}\n"
        f"Architectures: arm64 amd64 all\nComponents: main\nDescription: meshpi image test ({label})\nSHA256:\n"
        + "".join(
            f" {digest} {len(packages.encode())} main/binary-{a}/Packages\n" for a in ("arm64", "amd64")
        )
    )


def build_repo(work: Path, codename: str) -> Path:
    """The test's repository (see the top), in work/repo."""
    root, pool = work / "repo", work / "repo/pool"
    pool.mkdir(parents=True)
    debs = {(n, v): _deb(work, pool, n, v) for n, v in [("fakesec", "1.0"), ("fakesec", "1.1"),
            ("fakeother", "1.0"), ("fakeother", "1.1"), ("linux-image-meshpitest", "1"),
            ("linux-image-meshpitest", "2")]}  # fmt: skip
    _suite(root, codename, "Debian", "stable",
           [debs["fakesec", "1.0"], debs["fakeother", "1.0"], debs["fakeother", "1.1"],
            debs["linux-image-meshpitest", "1"]])  # fmt: skip
    _suite(root, f"{codename}-security", "Debian-Security", "stable-security",
           [debs["fakesec", "1.1"], debs["linux-image-meshpitest", "2"]])  # fmt: skip
    return root


@pytest.fixture
def repo(vm: Vm, tmp_path: Path) -> Iterator[str]:
    """The repository, served in vmnet (the VM's LAN side); the VM's codename."""
    codename = vm.out("lsb_release -cs")
    assert re.fullmatch(r"[a-z]+", codename), codename
    root = build_repo(tmp_path, codename)
    server = vm.net.vmnet.popen(["python3", "-m", "http.server", "--bind", VMNET_V4, "--directory", str(root),
                                 str(PORT)], log=tmp_path / "http.log")  # fmt: skip
    probe = f"import urllib.request; urllib.request.urlopen('http://{VMNET_V4}:{PORT}/dists/', timeout=5)"
    wait_for(lambda: vm.net.vmnet.run(["python3", "-c", probe], check=False).returncode == 0, 60,
             "the test's apt repository", interval=0.5)  # fmt: skip
    sources = "".join(
        f"deb [trusted=yes] http://{VMNET_V4}:{PORT} {s} main\n" for s in (codename, f"{codename}-security")
    )
    vm.ssh(
        f"mkdir -p {MT}/lists/partial {MT}/sources.list.d && printf '%s' '{APT_CONFIG}' > {MT}/apt.conf"
        f" && printf '%s' '{sources}' > {MT}/sources.list"
        f" && echo 'Unattended-Upgrade::Automatic-Reboot \"false\";' > {NO_REBOOT}"
    )
    try:
        yield codename
    finally:
        vm.ssh("rm -f /run/reboot-required /run/reboot-required.pkgs; "
               "dpkg --purge fakesec fakeother linux-image-meshpitest >/dev/null; "
               f"rm -rf {MT} {NO_REBOOT}; systemctl stop apt-daily.timer apt-daily-upgrade.timer", check=False, timeout=SLOW)  # fmt: skip
        vm.net.stop_process(server)


def _versions(vm: Vm) -> dict[str, str]:
    out = vm.ssh("dpkg-query -W fakesec fakeother linux-image-meshpitest", check=False).stdout
    return dict(line.split("\t") for line in out.splitlines() if "\t" in line)


def test_image_upgrades_configured_for_security_in_the_window(vm: Vm) -> None:
    assert (
        vm.out("systemctl is-enabled apt-daily.timer apt-daily-upgrade.timer meshpi-upgrades.path").split()
        == ["enabled"] * 3
    )
    assert "OnCalendar=*-*-* 03:40" in vm.out("systemctl cat apt-daily-upgrade.timer")
    dump = vm.out("apt-config dump Unattended-Upgrade")
    patterns = re.findall(r'^Unattended-Upgrade::Origins-Pattern:: "(.*)";$', dump, re.MULTILINE)
    assert patterns and all("Debian-Security" in p or p.endswith("-updates") for p in patterns), dump
    assert 'Unattended-Upgrade::Automatic-Reboot "true";' in dump
    # logrotate bounds unattended-upgrades' and apt's logs on the card
    assert vm.out("systemctl is-enabled logrotate.timer") == "enabled"


def test_image_unattended_upgrade_selects_only_the_security_update(vm: Vm, repo: str) -> None:
    vm.ssh(
        "systemctl stop apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service"
    )
    vm.ssh(f"{APT} apt-get update -q", timeout=SLOW)
    vm.ssh(f"{APT} DEBIAN_FRONTEND=noninteractive apt-get install -y -q fakesec=1.0 fakeother=1.0 "
           "linux-image-meshpitest=1", timeout=SLOW)  # fmt: skip
    assert _versions(vm) == {"fakesec": "1.0", "fakeother": "1.0", "linux-image-meshpitest": "1"}
    vm.ssh("rm -f /run/reboot-required /run/reboot-required.pkgs")  # (the install marked one)
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in vm.out(
        f"{APT} apt-config dump Unattended-Upgrade"
    )

    dry = vm.ssh(f"{APT} unattended-upgrade --dry-run --debug 2>&1", check=False, timeout=SLOW)
    assert dry.returncode == 0, dry.stdout[-3000:]
    chosen = re.findall(r"^Packages that will be upgraded: (.*)$", dry.stdout, re.MULTILINE)
    assert chosen and set(chosen[-1].split()) == {"fakesec", "linux-image-meshpitest"}, dry.stdout[-3000:]
    assert _versions(vm)["fakesec"] == "1.0"  # a dry run changes nothing

    real = vm.ssh(f"{APT} unattended-upgrade --debug 2>&1", check=False, timeout=SLOW)
    assert real.returncode == 0, real.stdout[-3000:]
    assert _versions(vm) == {"fakesec": "1.1", "fakeother": "1.0", "linux-image-meshpitest": "2"}, (
        real.stdout[-3000:]
    )

    # apt's hooks: what dpkg installed, kept on the card; a reboot marked for the kernel
    records = [json.loads(line) for line in vm.out("cat /var/lib/meshpi/upgrades.log").splitlines()]
    upgraded = {p["name"]: (p["from"], p["to"]) for r in records for p in r["packages"] if p["from"]}
    assert upgraded == {"fakesec": ("1.0", "1.1"), "linux-image-meshpitest": ("1", "2")}, records
    status = json.loads(vm.out("meshpi status --json"))["upgrades"]
    assert status["enabled"] and status["window"] == "03:00-05:00" and status["error"] is None, status
    assert {p["name"] for p in status["last_upgraded"]["packages"]} <= {"fakesec", "linux-image-meshpitest"}
    assert status["reboot_pending"] and "linux-image-meshpitest" in status["reboot_for"], status
    assert "reboot pending (linux-image-meshpitest)" in vm.out("meshpi status")


def test_image_upgrade_prefs_move_the_timers(vm: Vm) -> None:
    def timer() -> str:
        return vm.out(
            "systemctl cat apt-daily-upgrade.timer; systemctl is-enabled apt-daily-upgrade.timer || true"
        )

    try:
        vm.ssh("meshpi set --upgrade-window 01:00-02:30 >/dev/null")
        wait_for(lambda: "OnCalendar=*-*-* 01:30" in timer(), 300, "the timer in the new window", interval=2)
        vm.ssh("meshpi set --no-auto-upgrades >/dev/null")
        wait_for(lambda: timer().endswith("disabled"), 300, "the timers off", interval=2)
        assert 'APT::Periodic::Unattended-Upgrade "0";' in vm.out("cat /etc/apt/apt.conf.d/52meshpi-upgrades")
        assert json.loads(vm.out("meshpi status --json"))["upgrades"]["enabled"] is False
    finally:
        with contextlib.suppress(Exception):
            vm.ssh("meshpi set --auto-upgrades --upgrade-window 03:00-05:00 >/dev/null")
            wait_for(
                lambda: "03:40" in timer() and timer().endswith("enabled"),
                300,
                "the defaults back",
                interval=2,
            )
        vm.ssh("systemctl stop apt-daily.timer apt-daily-upgrade.timer", check=False)

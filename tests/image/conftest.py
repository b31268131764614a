"""The image tier's fixtures, session-scoped so that every tests/image/test_*.py shares
one build, one first boot (the self-test, powers off) and one held second boot (the VM
the tests log into): CI boots the VM twice for the whole tier.

Order: files whose tests use no VM (test_install.py) run first, then the VM's tests in
file order, tests marked `disturbs_vm` (an update, a reboot) after them, so the VM the
others see is the one first boot left, and the one marked `powers_off_vm` (the hard
resets, which end with the VM off to check its disk) last of all.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.machine import (
    BAD_TOML,
    GOOD_TOML,
    REPO,
    TIMINGS,
    VERSION,
    Boot,
    Vm,
    last_json,
    run,
)
from tests.image.vmnet import TAP, VmNet

_VM_FIXTURES = {"image", "card", "first_boot", "vm"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "disturbs_vm: changes the shared VM for good (e.g. an update): runs after every other test",
    )
    config.addinivalue_line(
        "markers",
        "powers_off_vm: ends with the shared VM powered off (the hard resets): runs last of all",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    image = [item for item in items if Path(str(item.path)).parent == Path(__file__).parent]
    if not image:
        return
    uses_vm = {item.path for item in image if _VM_FIXTURES & set(getattr(item, "fixturenames", ()))}

    def rank(item: pytest.Item) -> int:
        if item not in image:
            return 0
        if item.get_closest_marker("powers_off_vm"):
            return 4
        if item.get_closest_marker("disturbs_vm"):
            return 3
        return 2 if item.path in uses_vm else 1

    items.sort(key=rank)  # stable: file order and order within a file are kept


def pytest_sessionfinish(session: pytest.Session) -> None:
    if TIMINGS:  # the VM's teardown adds boot2_total_s after test_image_timings wrote them
        (REPO / "out").mkdir(exist_ok=True)
        (REPO / "out" / "image-test-timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the image tests need root (mmdebstrap --mode=root, binfmt, namespaces)")
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="session")
def image(work: Path) -> Path:
    started = time.monotonic()
    build = run(["scripts/build-image", "--no-compress"], timeout=3 * 3600)
    assert build.returncode == 0, f"build-image failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    TIMINGS["build_s"] = last_json(build.stdout)["build_s"]
    TIMINGS["build_wall_s"] = round(time.monotonic() - started, 1)
    path = REPO / "out" / f"meshpi-{VERSION}-arm64.img"
    assert path.is_file(), f"build-image did not write {path}"
    return path


@pytest.fixture(scope="session")
def card(image: Path, work: Path) -> Path:
    """The card both boots use (boot-image --in-place): first boot's work carries over."""
    copy = work / "card.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    return copy


@pytest.fixture(scope="session")
def ssh_key(work: Path) -> Path:
    key = work / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "image-test", "-f", str(key)], check=True
    )
    return key


@pytest.fixture(scope="session")
def first_boot(card: Path, work: Path) -> Boot:
    disk = work / "testdisk.img"
    made = run(["image/imgtest/make-disk", str(disk)], timeout=600)
    assert made.returncode == 0, f"make-disk failed:\n{made.stdout}\n{made.stderr}"
    toml, log = work / "bad.toml", work / "console-1.log"
    toml.write_text(BAD_TOML.format(ssh=""))
    booted = run(["scripts/boot-image", str(card), "--in-place", "--grow", "1G",
                  "--boot-file", f"meshpi.toml={toml}", "--append-extra", "meshpi.imgtest",
                  "--disk2", str(disk), "--log", str(log), "--timeout", "2400"], timeout=2700)  # fmt: skip
    boot = Boot(log.read_text(errors="replace"), last_json(booted.stdout), booted.returncode)
    TIMINGS["boot1_to_ready_s"] = boot.result["boot_to_ready_s"]
    TIMINGS["boot1_total_s"] = boot.result["total_s"]
    return boot


@pytest.fixture(scope="session")
def vm(first_boot: Boot, card: Path, ssh_key: Path, work: Path) -> Iterator[Vm]:
    toml, log, monitor = work / "good.toml", work / "console-2.log", work / "qemu-monitor.sock"
    key = ssh_key.with_suffix(".pub").read_text().strip()
    toml.write_text(GOOD_TOML.format(ssh=f'ssh_authorized_key = "{key}"'))
    with VmNet() as net:
        out = work / "boot-image-2.out"
        proc = net.vmnet.popen([str(REPO / "scripts/boot-image"), str(card), "--in-place",
                                "--boot-file", f"meshpi.toml={toml}", "--net", f"tap:{TAP}",
                                "--append-extra", "meshpi.imgtest=hold", "--log", str(log),
                                "--monitor", str(monitor), "--timeout", "7200"], log=out)  # fmt: skip
        vm = Vm(net, ssh_key, log, proc, monitor)
        started = time.monotonic()
        try:
            vm.wait_held(1, 1200)
        except Exception as error:
            raise AssertionError(f"{error}\nboot-image: {out.read_text()[-2000:]}") from error
        TIMINGS["boot2_to_ready_s"] = round(time.monotonic() - started, 1)
        try:
            yield vm
        finally:
            if vm.running():
                vm.ssh("systemctl --no-block poweroff", check=False, timeout=30)
                try:
                    proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    net.stop_process(proc)
            TIMINGS["boot2_total_s"] = round(time.monotonic() - started, 1)

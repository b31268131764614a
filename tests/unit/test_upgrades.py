"""Debian's security updates (issue 15 part 1): the config writer (window, on/off,
origins), apt's hooks (what was upgraded, a reboot for kernel/libc), the bounded log
and the status reader, which refuses garbage files clearly and never crashes.

The real unattended-upgrade selecting a security update is in tests/image/test_upgrades.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from appliance.core.prefs import Prefs, parse_prefs
from appliance.core.upgrades import (
    LOG_KEEP,
    LOG_MAX_BYTES,
    ORIGIN_PATTERNS,
    HookInputError,
    PackageChange,
    Record,
    Window,
    append_record,
    apt_conf,
    format_upgrades,
    parse_hook_v2,
    parse_window,
    timer_dropins,
)
from appliance.kernel.upgrades import (
    TAIL_BYTES,
    UpgradePaths,
    configure,
    hook_post,
    hook_pre,
    read_hook_input,
    read_status,
    remove,
)
from appliance.wire.fields import ConfigError


@pytest.fixture
def paths(tmp_path: Path) -> UpgradePaths:
    return UpgradePaths(
        apt_conf=tmp_path / "etc/apt/apt.conf.d/52meshpi-upgrades",
        units=tmp_path / "etc/systemd/system",
        log=tmp_path / "var/lib/meshpi/upgrades.log",
        pending=tmp_path / "run/meshpi-upgrades/pending.json",
        reboot_required=tmp_path / "run/reboot-required",
        stamps=tmp_path / "var/lib/apt/periodic",
    )


class FakeSystemctl:
    """Records systemctl's calls; every unit starts in `state` (is-enabled's answer)."""

    def __init__(self, state: str) -> None:
        self.start, self.states, self.calls = state, dict[str, str](), list[tuple[str, ...]]()

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[0] == "is-enabled":
            return subprocess.CompletedProcess(args, 0, self.states.get(args[1], self.start) + "\n", "")
        if args[0] in ("enable", "disable"):
            self.states[args[-1]] = args[0] + "d"
        return subprocess.CompletedProcess(args, 0, "", "")


# -- window and prefs ------------------------------------------------------------


def test_upgrades_window_parses_and_wraps_midnight() -> None:
    assert parse_window("03:00-05:00") == Window(180, 300)
    late = parse_window("23:30-01:00")
    assert (late.minutes, str(late), late.at(45)) == (90, "23:30-01:00", "00:15")
    assert str(parse_window(" 2:05-04:00 ")) == "02:05-04:00"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("3-5", "is not a window like 03:00-05:00"),
        ("03:00", "is not a window like"),
        ("24:00-02:00", "not on a clock"),
        ("03:60-05:00", "not on a clock"),
        ("03:00-03:20", "shorter than 30 minutes"),
        ("03:00-03:00", "shorter than 30 minutes"),
        (300, "must be a string"),
        ("03:00-05:00; rm -rf /", "is not a window like"),
    ],
)
def test_upgrades_window_refuses_garbage_with_the_value(value: object, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_prefs({"upgrade_window": value})
    assert "upgrade_window" in str(e.value) and repr(value) in str(e.value), e.value
    assert why in str(e.value), e.value


def test_upgrades_prefs_default_on_and_round_trip() -> None:
    d = Prefs()
    assert d.auto_upgrades and str(d.upgrade_window) == "03:00-05:00"
    p = parse_prefs({"auto_upgrades": False, "upgrade_window": "01:15-02:15"})
    assert p.to_json()["auto_upgrades"] is False and p.to_json()["upgrade_window"] == "01:15-02:15"
    assert parse_prefs(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ConfigError, match="auto_upgrades"):
        parse_prefs({"auto_upgrades": "yes"})


# -- the config writer -----------------------------------------------------------


def test_upgrades_apt_conf_on_off() -> None:
    on, off = apt_conf(True), apt_conf(False)
    assert 'APT::Periodic::Unattended-Upgrade "1";' in on and 'APT::Periodic::Update-Package-Lists "1";' in on
    assert (
        'APT::Periodic::Unattended-Upgrade "0";' in off and 'APT::Periodic::Update-Package-Lists "0";' in off
    )
    assert 'Unattended-Upgrade::Automatic-Reboot "true";' in on


@pytest.mark.skipif(shutil.which("apt-config") is None, reason="needs apt-config (any Debian)")
def test_upgrades_apt_reads_only_security_and_stable_updates_origins(tmp_path: Path) -> None:
    """apt itself parses the file after Debian's own 50unattended-upgrades: the origin list is
    replaced (not added to: Debian's allows the main suite's point releases), the hooks are set."""
    parts = tmp_path / "apt.conf.d"
    parts.mkdir()
    (parts / "50unattended-upgrades").write_text(
        'Unattended-Upgrade::Origins-Pattern {\n  "origin=Debian,codename=${distro_codename},label=Debian";\n};\n'
        'Unattended-Upgrade::Automatic-Reboot "false";\n'
    )
    (parts / "20auto-upgrades").write_text('APT::Periodic::Unattended-Upgrade "1";\n')
    (parts / "52meshpi-upgrades").write_text(apt_conf(False))
    main = tmp_path / "apt.conf"
    main.write_text(f'Dir::Etc::parts "{parts}/";\n')
    dump = subprocess.run(["apt-config", "dump"], env={**os.environ, "APT_CONFIG": str(main)},
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    patterns = [
        line.split('"')[1]
        for line in dump.splitlines()
        if line.startswith("Unattended-Upgrade::Origins-Pattern:: ")
    ]
    assert patterns == list(ORIGIN_PATTERNS)
    assert all("security" in p.lower() or "-updates" in p for p in patterns)
    assert 'Unattended-Upgrade::Automatic-Reboot "true";' in dump
    assert 'APT::Periodic::Unattended-Upgrade "0";' in dump  # off wins over 20auto-upgrades
    assert 'DPkg::Tools::Options::/usr/local/bin/meshpi-upgrades::Version "2";' in dump
    assert "meshpi-upgrades hook-pre || cat >/dev/null" in dump


def test_upgrades_timers_follow_the_window() -> None:
    drop = timer_dropins(parse_window("03:00-05:00"))
    assert "OnCalendar=\nOnCalendar=*-*-* 03:00\nRandomizedDelaySec=2400\n" in drop["apt-daily.timer"]
    assert "OnCalendar=*-*-* 03:40\nRandomizedDelaySec=2400\n" in drop["apt-daily-upgrade.timer"]
    assert all("Persistent=false" in text for text in drop.values())
    late = timer_dropins(parse_window("23:30-01:00"))
    assert "OnCalendar=*-*-* 23:30\nRandomizedDelaySec=1800" in late["apt-daily.timer"]
    assert "OnCalendar=*-*-* 00:00\n" in late["apt-daily-upgrade.timer"]


def test_upgrades_configure_writes_once_and_moves_the_timers(paths: UpgradePaths) -> None:
    ctl = FakeSystemctl("disabled")
    changed = configure(Prefs(), paths, True, ctl)
    assert str(paths.apt_conf) in changed and "apt-daily-upgrade.timer enabled" in changed
    assert ("enable", "--now", "apt-daily.timer") in ctl.calls and ("daemon-reload",) in ctl.calls
    assert "03:40" in paths.dropin("apt-daily-upgrade.timer").read_text()
    ctl.calls.clear()
    assert configure(Prefs(), paths, True, ctl) == []  # nothing differs: nothing written or reloaded
    assert all(call[0] == "is-enabled" for call in ctl.calls), ctl.calls
    changed = configure(parse_prefs({"upgrade_window": "01:00-02:30"}), paths, True, ctl)
    assert changed == [str(paths.dropin("apt-daily.timer")), str(paths.dropin("apt-daily-upgrade.timer"))]
    assert ("restart", "apt-daily-upgrade.timer") in ctl.calls  # the new time counts tonight
    changed = configure(
        parse_prefs({"auto_upgrades": False, "upgrade_window": "01:00-02:30"}), paths, True, ctl
    )
    assert changed == [str(paths.apt_conf), "apt-daily.timer disabled", "apt-daily-upgrade.timer disabled"]
    assert 'Unattended-Upgrade "0"' in paths.apt_conf.read_text()


def test_upgrades_configure_offline_starts_nothing(paths: UpgradePaths) -> None:
    ctl = FakeSystemctl("disabled")
    configure(Prefs(), paths, False, ctl)
    assert ("enable", "apt-daily.timer") in ctl.calls
    assert not [c for c in ctl.calls if c[0] in ("daemon-reload", "restart") or "--now" in c], ctl.calls
    masked = FakeSystemctl("masked")  # the owner masked them: left alone
    configure(parse_prefs({"upgrade_window": "04:00-06:00"}), paths, True, masked)
    assert not [c for c in masked.calls if c[0] in ("enable", "disable")]


def test_upgrades_remove_takes_only_ours(paths: UpgradePaths) -> None:
    configure(Prefs(), paths, False, None)
    theirs = paths.units / "apt-daily.timer.d/owner.conf"
    theirs.write_text("[Timer]\n")
    removed = remove(paths, live=False)
    assert len(removed) == 3 and not paths.apt_conf.exists()
    assert theirs.exists() and not (paths.units / "apt-daily-upgrade.timer.d").exists()


# -- apt's hooks -------------------------------------------------------------------

HOOK_INPUT = """VERSION 2
APT::Architecture=arm64
Dir::Etc::parts=apt.conf.d/

libc6 2.41-12 < 2.41-12+deb13u1 /var/cache/apt/archives/libc6_2.41-12+deb13u1_arm64.deb
openssl 3.5.1-1 < 3.5.1-1+deb13u1 /var/cache/apt/archives/openssl_3.5.1-1+deb13u1_arm64.deb
linux-image-6.12.48+deb13-arm64 - < 6.12.48-1 /var/cache/apt/archives/linux-image-6.12.48_arm64.deb
oldpkg 1.0 > - **REMOVE**
libc6 2.41-12 < 2.41-12+deb13u1 **CONFIGURE**
tzdata 2025b-4 = 2025b-4 **CONFIGURE**
"""


def test_upgrades_hook_parses_apt_v2() -> None:
    assert parse_hook_v2(HOOK_INPUT) == (
        PackageChange("libc6", "2.41-12", "2.41-12+deb13u1"),
        PackageChange("openssl", "3.5.1-1", "3.5.1-1+deb13u1"),
        PackageChange("linux-image-6.12.48+deb13-arm64", None, "6.12.48-1"),
    )


@pytest.mark.parametrize(
    "text",
    ["", "VERSION 3\n\n", "VERSION 2\nA=b\n", "VERSION 2\n\nlibc6 1 < \n", "\x00\xff" * 100],
)
def test_upgrades_hook_refuses_garbage(text: str) -> None:
    with pytest.raises(HookInputError):
        parse_hook_v2(text)


def test_upgrades_hook_drains_its_input(tmp_path: Path) -> None:
    """apt writes the whole list before it goes on: the hook reads it all, even too much."""
    import io

    big = io.BytesIO(b"VERSION 2\n\n" + b"x" * (5 * 1024 * 1024))
    with pytest.raises(HookInputError, match="larger than"):
        read_hook_input(big)
    assert big.read() == b""


def test_upgrades_hooks_log_what_dpkg_installed_and_mark_a_reboot(paths: UpgradePaths) -> None:
    hook_pre(HOOK_INPUT, paths)
    assert paths.pending.exists()
    # dpkg failed on openssl: only what is installed now is logged.
    installed = {
        "libc6": "2.41-12+deb13u1",
        "openssl": "3.5.1-1",
        "linux-image-6.12.48+deb13-arm64": "6.12.48-1",
    }
    record = hook_post(paths, now=1000.0, versions=lambda names: {n: installed[n] for n in names})
    assert record is not None and not paths.pending.exists()
    assert [p.name for p in record.packages] == ["libc6", "linux-image-6.12.48+deb13-arm64"]
    assert record.reboot == ("libc6", "linux-image-6.12.48+deb13-arm64")
    assert paths.reboot_required.exists()
    pkgs = paths.reboot_required.with_name("reboot-required.pkgs").read_text().split()
    assert pkgs == ["libc6", "linux-image-6.12.48+deb13-arm64"]
    line = json.loads(paths.log.read_text())
    assert line["packages"][0] == {"name": "libc6", "from": "2.41-12", "to": "2.41-12+deb13u1"}
    assert hook_post(paths) is None  # nothing pending: nothing logged twice


def test_upgrades_hook_without_reboot_packages_marks_none(paths: UpgradePaths) -> None:
    hook_pre("VERSION 2\n\nopenssl 1 < 2 /x.deb\n", paths)
    record = hook_post(paths, now=5.0, versions=lambda names: {"openssl": "2"})
    assert record is not None and record.reboot == () and not paths.reboot_required.exists()


def test_upgrades_log_is_bounded() -> None:
    text = ""
    for i in range(LOG_KEEP + 50):
        text = append_record(text, Record(float(i), (PackageChange(f"p{i}", "1", "2"),), ()))
    lines = text.splitlines()
    assert len(lines) == LOG_KEEP and json.loads(lines[0])["time"] == 50.0
    huge = Record(
        1.0, tuple(PackageChange(f"package-with-a-long-name-{i}", "1.0", "1.1") for i in range(400)), ()
    )
    for _ in range(10):
        text = append_record(text, huge)
    assert len(text.encode()) <= LOG_MAX_BYTES * 1.05 or len(text.splitlines()) == 1


# -- the status reader -------------------------------------------------------------


def test_upgrades_status_with_nothing_yet(paths: UpgradePaths) -> None:
    st = read_status(Prefs(), paths)
    assert st == {"enabled": True, "window": "03:00-05:00", "last_checked": None, "last_run": None,
                  "last_upgraded": None, "reboot_pending": False, "reboot_for": [], "error": None}  # fmt: skip
    assert "checked never; last upgraded nothing yet" in format_upgrades(st, 0)


def test_upgrades_status_reads_stamps_log_and_reboot(paths: UpgradePaths) -> None:
    paths.stamps.mkdir(parents=True)
    (paths.stamps / "update-stamp").touch()
    os.utime(paths.stamps / "update-stamp", (1500, 1500))
    hook_pre(HOOK_INPUT, paths)
    hook_post(paths, now=2000.0, versions=lambda names: {"libc6": "2.41-12+deb13u1"})
    st = read_status(parse_prefs({"auto_upgrades": False}), paths)
    assert st["enabled"] is False and st["last_checked"] == 1500
    assert st["last_upgraded"]["time"] == 2000.0 and st["last_upgraded"]["packages"][0]["name"] == "libc6"
    assert st["reboot_pending"] is True and st["reboot_for"] == ["libc6"] and st["error"] is None
    text = format_upgrades(st, 2000.0 + 7200)
    assert text == "upgrades: off; checked 2h ago; last upgraded libc6 (2h ago); reboot pending (libc6)"


GARBAGE: list[tuple[str, bytes]] = [
    ("not json", b"hello\n"),
    ("a list", b"[1, 2]\n"),
    ("missing fields", b'{"time": 1}\n'),
    ("extra fields", b'{"time": 1, "packages": [], "reboot": [], "x": 1}\n'),
    ("bad time", b'{"time": "yesterday", "packages": [], "reboot": []}\n'),
    ("bool time", b'{"time": true, "packages": [], "reboot": []}\n'),
    ("bad package", b'{"time": 1, "packages": [{"name": "a b", "from": null, "to": "1"}], "reboot": []}\n'),
    ("package not object", b'{"time": 1, "packages": ["libc6"], "reboot": []}\n'),
    ("binary", b"\x00\xff\xfe" * 50 + b"\n"),
    ("truncated", b'{"time": 1, "packages": [{"name": "libc6", "fr'),
]


@pytest.mark.parametrize(("name", "garbage"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_upgrades_status_refuses_a_garbage_log_clearly(
    paths: UpgradePaths, name: str, garbage: bytes
) -> None:
    good = append_record("", Record(5.0, (PackageChange("openssl", "1", "2"),), ()))
    paths.log.parent.mkdir(parents=True)
    paths.log.write_bytes(good.encode() + garbage)
    st = read_status(Prefs(), paths)
    assert st["error"] is not None and str(paths.log) in st["error"], st
    assert st["last_upgraded"]["packages"][0]["name"] == "openssl"  # the last good record
    paths.log.write_bytes(garbage)
    st = read_status(Prefs(), paths)
    assert st["last_upgraded"] is None and st["error"] is not None
    json.dumps(st)  # still an answer the LocalAPI can send


def test_upgrades_status_survives_huge_and_unreadable_files(paths: UpgradePaths) -> None:
    paths.log.parent.mkdir(parents=True)
    good = append_record("", Record(9.0, (PackageChange("openssl", "1", "2"),), ()))
    paths.log.write_bytes(b"x" * (10 * TAIL_BYTES) + b"\n" + good.encode())
    assert read_status(Prefs(), paths)["last_upgraded"]["time"] == 9.0
    paths.log.unlink()
    paths.log.mkdir()  # a directory where the file should be
    st = read_status(Prefs(), paths)
    assert st["last_upgraded"] is None and "cannot be read" in st["error"]
    paths.reboot_required.parent.mkdir(parents=True)
    paths.reboot_required.touch()
    paths.reboot_required.with_name("reboot-required.pkgs").write_bytes(b"\x00\x1b[31m evil\n" * 2000)
    st = read_status(Prefs(), paths)
    assert st["reboot_pending"] and len(st["reboot_for"]) <= 20
    assert all(n.isprintable() for n in st["reboot_for"])


def test_upgrades_status_in_the_localapi_answer_shape(paths: UpgradePaths) -> None:
    """Every key the dashboard and `meshpi status` read is there, JSON types only."""
    st: dict[str, Any] = read_status(Prefs(), paths)
    assert json.loads(json.dumps(st)) == st


def test_upgrades_units_watch_the_agents_prefs_and_run_the_hooks_command() -> None:
    """The image's units, apt's hook lines and the agent's state directory name the same files."""
    from appliance.agent.statedir import DEFAULT_STATE_DIR, StateDir
    from appliance.core.upgrades import HOOK

    units = Path(__file__).parents[2] / "image/overlay/usr/lib/systemd/system"
    prefs = StateDir(DEFAULT_STATE_DIR).path / "prefs.json"
    assert f"PathChanged={prefs}\n" in (units / "meshpi-upgrades.path").read_text()
    assert f"ExecStart={HOOK} configure --prefs {prefs}\n" in (units / "meshpi-upgrades.service").read_text()
    assert UpgradePaths().log == StateDir(DEFAULT_STATE_DIR).upgrades_file


def test_upgrades_line_in_meshpi_status(paths: UpgradePaths) -> None:
    from appliance.agent.localapi.status import format_status

    st = {"agent": "running", "version": "0.1", "led": "ready", "control": {"state": "connected"},
          "upgrades": read_status(parse_prefs({"upgrade_window": "02:00-04:00"}), paths)}  # fmt: skip
    assert "upgrades: on, 02:00-04:00; checked never; last upgraded nothing yet" in format_status(st)
    assert "upgrades" not in format_status({**st, "upgrades": None})  # an agent from before

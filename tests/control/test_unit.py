"""meshpi-control's systemd unit: unprivileged and sandboxed, as systemd itself judges
it (`systemd-analyze security --offline=yes`, no running systemd needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "image/overlay/usr/lib/systemd/system/meshpi-control.service"
MAX_EXPOSURE = 2.0  # systemd's scale: 0 (locked down) .. 10 (root with everything); was 7.1


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_control_runs_unprivileged_with_admin_on_loopback() -> None:
    s = _settings()
    assert s["DynamicUser"] == ["yes"] and s["StateDirectory"] == ["meshpi-control"]
    assert s["CapabilityBoundingSet"] == [""] and s["NoNewPrivileges"] == ["yes"]
    assert s["ProtectSystem"] == ["strict"] and s["PrivateTmp"] == ["yes"]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in s["SystemCallFilter"]
    (exec_start,) = s["ExecStart"]
    assert (
        "--admin-listen 127.0.0.1:8081" in exec_start and "--state-dir /var/lib/meshpi-control" in exec_start
    )


def test_unit_control_systemd_analyze_security_score(capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    score = float(found.group(1))
    with capsys.disabled():
        print(f"\n  systemd-analyze security {UNIT.name}: {score} {found.group(2)} (at most {MAX_EXPOSURE})")
    assert score <= MAX_EXPOSURE, done.stdout

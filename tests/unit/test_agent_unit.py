"""meshpi-agent's systemd unit: root with four capabilities, sandboxed, as systemd
itself judges it (`systemd-analyze security --offline=yes`, no running systemd
needed). tests/netns/test_agent_sandbox.py runs the agent with the same capabilities;
the image tier boots it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "image/overlay/usr/lib/systemd/system/meshpi-agent.service"
MAX_EXPOSURE = 3.2  # systemd's scale: 0 (locked down) .. 10 (root with everything); was 9.6
CAPABILITIES = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_READ_SEARCH"}


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_agent_unit_keeps_only_the_capabilities_it_uses() -> None:
    s = settings()
    (bounding,) = s["CapabilityBoundingSet"]
    assert set(bounding.split()) == CAPABILITIES
    assert s["AmbientCapabilities"] == [""] and s["NoNewPrivileges"] == ["yes"]
    assert "User" not in s and "DynamicUser" not in s  # root, bounded: it runs nft and wireguard-go


def test_agent_unit_sandbox_leaves_what_the_agent_writes_writable() -> None:
    s = settings()
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"] and s["PrivateTmp"] == ["yes"]
    assert s["StateDirectory"] == ["meshpi"]  # /var/lib/meshpi
    assert s["RuntimeDirectory"] == ["meshpi wireguard"] and s["RuntimeDirectoryPreserve"] == ["yes"]
    # net.* sysctls under /proc/sys and the ACT LED under /sys must stay writable.
    assert "ProtectKernelTunables" not in s and "ProcSubset" not in s
    assert "PrivateNetwork" not in s and "PrivateUsers" not in s
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_NETLINK AF_UNIX"]
    assert "/dev/net/tun rw" in s["DeviceAllow"]  # wireguard-go
    assert s["KillMode"] == ["process"]  # a wireguard-go it started outlives it


def test_agent_unit_systemd_analyze_security_score(capsys: pytest.CaptureFixture[str]) -> None:
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

"""The host's DNS, resolv.conf backend (kernel/hostdns.py), on real files: a
namespace's /etc/netns/<ns>/resolv.conf, which `ip netns exec` mounts over
/etc/resolv.conf for every process it starts there (getent, the lab's agents).

systemd-resolved does not run on this host: its backend is proven in the image
tier (tests/image/test_hostdns.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from appliance.core.hostdns import HostDnsConfig, is_ours
from appliance.kernel.hostdns import RESOLV_CONF, HostDns, in_other_netns
from tests.lab.mesh import meshpi_binary
from tests.unit.meshes import KEYS, netmap_json, node

ORIGINAL = b"# written by the cafe's DHCP client\nnameserver 10.77.0.1\nsearch lan\n\n;no newline at the end"
CFG = HostDnsConfig(
    "meshpi0", (ip_address("100.64.0.2"), ip_address("fd7a:6d70:6900::2")), ("mesh.internal",), True
)


@pytest.fixture
def resolv_conf(netns: str) -> Iterator[Path]:
    """/etc/netns/<ns>/resolv.conf's directory exists, the file not yet; removed afterwards."""
    directory = Path("/etc/netns") / netns
    directory.mkdir(parents=True)
    try:
        yield directory / "resolv.conf"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def seen_inside(ns: str) -> str:
    """/etc/resolv.conf as a process in the namespace reads it."""
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/etc/resolv.conf"], capture_output=True, text=True
    )
    return res.stdout if res.returncode == 0 else f"<{res.stderr.strip()}>"


def test_hostdns_resolv_conf_applied_then_restored_byte_for_byte(
    netns: str, resolv_conf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    resolv_conf.write_bytes(ORIGINAL)
    os.chmod(resolv_conf, 0o640)
    host = HostDns(tmp_path / "hostdns.json", resolv_conf)
    assert host.original_servers() == (ip_address("10.77.0.1"),)
    with caplog.at_level(logging.INFO, logger="appliance.kernel.hostdns"):
        host.apply(CFG)
        inode = resolv_conf.stat().st_ino
        host.apply(CFG)  # idempotent: nothing written, nothing logged
    assert resolv_conf.stat().st_ino == inode
    assert len([r for r in caplog.records if "now asks" in r.message]) == 1, caplog.text
    inside = seen_inside(netns)
    assert is_ours(inside) and "nameserver 100.64.0.2\n" in inside and "10.77.0.1" not in inside
    assert host.original_servers() == (ip_address("10.77.0.1"),)  # the host's own, not ours
    saved = json.loads((tmp_path / "hostdns.json").read_text())
    assert saved["backend"] == "resolv.conf" and saved["path"] == str(resolv_conf)
    assert oct((tmp_path / "hostdns.json").stat().st_mode & 0o777) == "0o600"

    host.restore()
    assert resolv_conf.read_bytes() == ORIGINAL
    assert resolv_conf.stat().st_mode & 0o777 == 0o640
    assert not (tmp_path / "hostdns.json").exists()
    host.restore()  # twice: nothing to do
    assert resolv_conf.read_bytes() == ORIGINAL and seen_inside(netns) == ORIGINAL.decode()


def test_hostdns_resolv_conf_symlink_comes_back_as_the_same_symlink(
    resolv_conf: Path, tmp_path: Path
) -> None:
    target = tmp_path / "upstream-resolv.conf"
    target.write_bytes(b"nameserver 192.168.77.1\n")
    os.symlink(target, resolv_conf)
    host = HostDns(tmp_path / "hostdns.json", resolv_conf)
    assert host.original_servers() == (ip_address("192.168.77.1"),)
    host.apply(CFG)
    assert not resolv_conf.is_symlink() and is_ours(resolv_conf.read_bytes())
    assert target.read_bytes() == b"nameserver 192.168.77.1\n"  # the link was replaced, not its target
    host.restore()
    assert resolv_conf.is_symlink() and os.readlink(resolv_conf) == str(target)


def test_hostdns_resolv_conf_that_was_absent_is_removed_again(
    netns: str, resolv_conf: Path, tmp_path: Path
) -> None:
    host = HostDns(tmp_path / "hostdns.json", resolv_conf)
    host.apply(CFG)
    assert "nameserver 100.64.0.2" in seen_inside(netns)
    host.restore()
    assert not resolv_conf.exists() and not resolv_conf.is_symlink()


def test_hostdns_resolv_conf_rewritten_by_the_host_becomes_the_original(
    resolv_conf: Path, tmp_path: Path
) -> None:
    resolv_conf.write_bytes(ORIGINAL)
    host = HostDns(tmp_path / "hostdns.json", resolv_conf)
    host.apply(CFG)
    renewed = b"nameserver 10.77.0.254\n"  # a DHCP client's new lease
    resolv_conf.write_bytes(renewed)
    host.apply(CFG)
    assert is_ours(resolv_conf.read_bytes())
    assert host.original_servers() == (ip_address("10.77.0.254"),)
    host.restore()
    assert resolv_conf.read_bytes() == renewed


def test_hostdns_restore_leaves_a_file_someone_else_wrote_since(resolv_conf: Path, tmp_path: Path) -> None:
    resolv_conf.write_bytes(ORIGINAL)
    host = HostDns(tmp_path / "hostdns.json", resolv_conf)
    host.apply(CFG)
    resolv_conf.write_bytes(b"nameserver 10.0.0.9\n")  # e.g. the owner, by hand
    host.restore()
    assert resolv_conf.read_bytes() == b"nameserver 10.0.0.9\n"
    assert not (tmp_path / "hostdns.json").exists()


def test_hostdns_corrupt_record_never_touches_the_file(resolv_conf: Path, tmp_path: Path) -> None:
    resolv_conf.write_bytes(ORIGINAL)
    record = tmp_path / "hostdns.json"
    for garbage in (b"{", b"[]", b'{"backend": "resolv.conf"}', b"\xff" * 100, b'{"original": 3}'):
        record.write_bytes(garbage)
        HostDns(record, resolv_conf).restore()
        assert resolv_conf.read_bytes() == ORIGINAL and not record.exists()


# -- a real agent: kill -9, restart, down; accept_dns; a clean stop ------------------------


def _agent(ns: str, tmp: Path, resolv_conf: Path) -> subprocess.Popen[bytes]:
    cmd = ["ip", "netns", "exec", ns, str(meshpi_binary()), "agent", "--netmap", str(tmp / "netmap.json"),
           "--prefs", str(tmp / "prefs.json"), "--state-dir", str(tmp / "state"),
           "--resolv-conf", str(resolv_conf)]  # fmt: skip
    with open(tmp / "agent.log", "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait(predicate: object, what: str, tmp: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            log = (tmp / "agent.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"timed out waiting for {what}; agent log:\n{log}")
        time.sleep(0.05)


def _down(ns: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, str(meshpi_binary()), "down", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_hostdns_agent_kill_9_restart_down_restores_the_original(
    netns: str, resolv_conf: Path, tmp_path: Path
) -> None:
    resolv_conf.write_bytes(ORIGINAL)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "node.key").write_text(KEYS["laptop"].secret_base64() + "\n")
    netmap = netmap_json("laptop", [node("pi", ["0.0.0.0/0", "::/0"])])
    names = {"capver": 3, "dns": {"domain": "mesh.internal"}}  # control's names: the agent runs its resolver
    (tmp_path / "netmap.json").write_text(json.dumps(netmap | names))
    interface = f"mpd{os.getpid() % 100000}"
    prefs = {"interface": interface, "backend": "userspace", "exit_node": "pi"}
    (tmp_path / "prefs.json").write_text(json.dumps(prefs))
    managed = lambda: is_ours(resolv_conf.read_bytes())  # noqa: E731
    agent = _agent(netns, tmp_path, resolv_conf)
    try:
        _wait(managed, "the agent to manage resolv.conf", tmp_path)
        assert "nameserver 100.64.0.2" in seen_inside(netns)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        assert managed() and (state / "hostdns.json").exists()  # a crash leaves it: DNS stays closed

        agent = _agent(netns, tmp_path, resolv_conf)
        _wait(lambda: "took over" in (tmp_path / "agent.log").read_text(), "the restarted agent", tmp_path)
        assert managed()
        # accept_dns off: restored at once, while the agent runs on.
        (tmp_path / "prefs.json").write_text(json.dumps(prefs | {"accept_dns": False}))
        _wait(lambda: resolv_conf.read_bytes() == ORIGINAL, "accept_dns=false to restore", tmp_path)
        (tmp_path / "prefs.json").write_text(json.dumps(prefs))
        _wait(managed, "accept_dns=true to manage it again", tmp_path)
        # The file is written before its log line: a kill in between would lose the line.
        asks = lambda: (tmp_path / "agent.log").read_text().count("now asks") == 2  # noqa: E731
        _wait(asks, "the agent to log that it manages it again", tmp_path)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        res = _down(netns, state)
        assert res.returncode == 0, res.stderr
        assert resolv_conf.read_bytes() == ORIGINAL, "kill -9, restart, down: not the original"
        assert not (state / "hostdns.json").exists()

        # A clean stop restores too (the agent's resolver stops with it).
        agent = _agent(netns, tmp_path, resolv_conf)
        _wait(managed, "the agent to manage resolv.conf again", tmp_path)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0
        assert resolv_conf.read_bytes() == ORIGINAL
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        _down(netns, state)
    log = (tmp_path / "agent.log").read_text()
    assert log.count("now asks") == 3, log  # once per start that changed it, never per apply


def test_hostdns_in_a_lab_namespace_never_touches_the_hosts_resolv_conf(inside: str, tmp_path: Path) -> None:
    """An agent under `ip netns exec` without --resolv-conf (every other lab test)
    sees the host's own /etc/resolv.conf: it must stay exactly as it is."""
    before = (RESOLV_CONF.read_bytes(), RESOLV_CONF.stat().st_mtime_ns) if RESOLV_CONF.exists() else None
    assert in_other_netns()
    host = HostDns(tmp_path / "hostdns.json")
    assert host.confined()
    host.apply(CFG)
    host.restore()
    after = (RESOLV_CONF.read_bytes(), RESOLV_CONF.stat().st_mtime_ns) if RESOLV_CONF.exists() else None
    assert after == before and not (tmp_path / "hostdns.json").exists()


def test_hostdns_the_hosts_own_namespace_is_not_confined() -> None:
    assert not in_other_netns()


_READ_ONLY_ETC = """
import subprocess, sys
from ipaddress import ip_address
from pathlib import Path
from appliance.core.hostdns import HostDnsConfig
from appliance.kernel.hostdns import HostDns
etc, source, saved = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
for cmd in (["mount", "--bind", str(etc), str(etc)], ["mount", "-o", "remount,bind,ro", str(etc), str(etc)],
            ["mount", "--bind", source, str(etc / "resolv.conf")]):
    subprocess.run(cmd, check=True)
host = HostDns(saved, etc / "resolv.conf")
host.apply(HostDnsConfig("meshpi0", (ip_address("100.64.0.2"),), (), False))
print("applied:", (etc / "resolv.conf").read_text().splitlines()[1])
host.restore()
"""


def test_hostdns_read_only_etc_with_a_bind_mounted_resolv_conf_is_written_in_place(tmp_path: Path) -> None:
    """/etc read-only but resolv.conf bind-mounted writable (the agent's sandbox with
    ReadWritePaths=-/etc/resolv.conf, a container): no rename is possible, so the
    file is written in place, and restored in place. Mounts in a private mount namespace."""
    etc, source = tmp_path / "etc", tmp_path / "source-resolv.conf"
    etc.mkdir()
    (etc / "resolv.conf").write_bytes(b"")
    source.write_bytes(ORIGINAL)
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _READ_ONLY_ETC,
         str(etc), str(source), str(tmp_path / "hostdns.json")],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "applied: nameserver 100.64.0.2" in res.stdout, res.stdout + res.stderr
    assert source.read_bytes() == ORIGINAL
    assert not (tmp_path / "hostdns.json").exists()

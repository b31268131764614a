"""ProcFs and Sysctls against the real /proc/sys/net of a throwaway namespace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from appliance.kernel.base import InterfaceNotFound, KernelError
from appliance.kernel.sysctl import OriginalsFileError, ProcFs, SysctlNotFound, Sysctls

FWD4 = "net.ipv4.ip_forward"
FWD6 = "net.ipv6.conf.all.forwarding"
PORTS = "net.ipv4.ip_local_port_range"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def sysctl(key: str) -> str:
    """Read the value straight from /proc (keys here have no interface names)."""
    return Path("/proc/sys", *key.split(".")).read_text().strip()


def test_sysctl_procfs_reads_and_writes_namespace_values(inside: str) -> None:
    procfs = ProcFs()
    assert procfs.read(FWD4) == "0"  # a fresh namespace does not forward
    procfs.write(FWD4, "1")
    assert procfs.read(FWD4) == "1"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == "1\n"


def test_sysctl_procfs_interface_name_with_dot(inside: str) -> None:
    ip("link", "add", "v0.100", "type", "veth", "peer", "name", "v0p")
    procfs = ProcFs()
    procfs.write("net.ipv4.conf.v0.100.rp_filter", "2")
    assert procfs.read("net.ipv4.conf.v0.100.rp_filter") == "2"
    assert Path("/proc/sys/net/ipv4/conf/v0.100/rp_filter").read_text().strip() == "2"


def test_sysctl_procfs_errors_name_key(inside: str) -> None:
    procfs = ProcFs()
    with pytest.raises(InterfaceNotFound, match="net.ipv4.conf.nope0.rp_filter: no such interface"):
        procfs.read("net.ipv4.conf.nope0.rp_filter")
    with pytest.raises(SysctlNotFound, match="net.ipv4.no_such_thing: no such sysctl"):
        procfs.write("net.ipv4.no_such_thing", "1")
    with pytest.raises(KernelError, match="write 'lots' to sysctl net.ipv4.ip_forward: Invalid"):
        procfs.write(FWD4, "lots")


def test_sysctl_save_restore_across_agent_restart(inside: str, tmp_path: Path) -> None:
    originals = tmp_path / "sysctl-originals.json"
    first = Sysctls(ProcFs(), originals)
    first.set(FWD4, "1")
    first.set(FWD6, "1")
    first.set(PORTS, "40000 50000")
    assert sysctl(FWD4) == "1" and sysctl(FWD6) == "1"
    assert json.loads(originals.read_text()) == {FWD4: "0", FWD6: "0", PORTS: "32768 60999"}

    restarted = Sysctls(ProcFs(), originals)  # as if the agent had restarted
    assert restarted.managed() == {FWD4: "1", FWD6: "1", PORTS: "40000 50000"}
    assert restarted.original(FWD4) == "0"
    restarted.restore(FWD6)
    assert sysctl(FWD6) == "0" and restarted.original(FWD6) is None
    restarted.restore_all()
    assert sysctl(FWD4) == "0" and sysctl(PORTS).split() == ["32768", "60999"]
    assert restarted.managed() == {}
    assert not originals.exists()


def test_sysctl_restore_after_interface_deleted(inside: str, tmp_path: Path) -> None:
    ip("link", "add", "meshpi0", "type", "veth", "peer", "name", "meshpi0p")
    sysctls = Sysctls(ProcFs(), tmp_path / "originals.json")
    sysctls.set("net.ipv4.conf.meshpi0.rp_filter", "2")
    sysctls.set(FWD4, "1")
    ip("link", "del", "meshpi0")
    assert sysctls.managed() == {FWD4: "1"}
    sysctls.restore_all()  # the interface took its sysctls with it: not an error
    assert sysctls.managed() == {} and sysctl(FWD4) == "0"


def test_sysctl_corrupt_originals_file(inside: str, tmp_path: Path) -> None:
    originals = tmp_path / "sysctl-originals.json"
    originals.write_text('{"net.ipv4.ip_forward": "0"')  # torn by hand, say
    with pytest.raises(OriginalsFileError, match=f"{originals}: corrupt"):
        Sysctls(ProcFs(), originals).set(FWD4, "1")
    assert sysctl(FWD4) == "0"  # nothing written without a safe record
    Sysctls(ProcFs(), originals).set(FWD4, "1")  # the next start works
    assert json.loads(originals.read_text()) == {FWD4: "0"}

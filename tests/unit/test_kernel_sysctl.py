"""Pure logic of appliance/kernel/sysctl.py: key mapping and save/restore bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.kernel.base import InterfaceNotFound, KernelError
from appliance.kernel.sysctl import (
    OriginalsFileError,
    SysctlKeyError,
    Sysctls,
    key_parts,
    key_path,
    normalise,
)


class DictProcSys:
    """An in-memory /proc/sys; keys missing from `values` do not exist."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)
        self.writes: list[tuple[str, str]] = []
        self.refuse: set[str] = set()

    def read(self, key: str) -> str:
        if key not in self.values:
            raise InterfaceNotFound(f"read sysctl {key}: gone")
        return self.values[key]

    def write(self, key: str, value: str) -> None:
        if key in self.refuse:
            raise KernelError(f"write {value!r} to sysctl {key}: Invalid argument")
        if key not in self.values:
            raise InterfaceNotFound(f"write sysctl {key}: gone")
        self.writes.append((key, value))
        self.values[key] = value


FWD = "net.ipv4.ip_forward"
RPF = "net.ipv4.conf.eth0.100.rp_filter"


@pytest.fixture
def procsys() -> DictProcSys:
    return DictProcSys({FWD: "0", RPF: "1", "net.ipv4.ip_local_port_range": "32768\t60999"})


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ("net.ipv4.ip_forward", ("net", "ipv4", "ip_forward")),
        ("net.ipv4.conf.meshpi0.rp_filter", ("net", "ipv4", "conf", "meshpi0", "rp_filter")),
        ("net.ipv4.conf.eth0.100.rp_filter", ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
        ("net.ipv6.conf.eth0.100.forwarding", ("net", "ipv6", "conf", "eth0.100", "forwarding")),
        ("net.ipv6.conf.all.forwarding", ("net", "ipv6", "conf", "all", "forwarding")),
        ("net.ipv4.neigh.br0.2.gc_stale_time", ("net", "ipv4", "neigh", "br0.2", "gc_stale_time")),
        ("net/ipv4/conf/eth0.100/rp_filter", ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
        ("kernel.hostname", ("kernel", "hostname")),
    ],
)
def test_sysctl_key_maps_to_proc_path(key: str, parts: tuple[str, ...]) -> None:
    assert key_parts(key) == parts
    assert key_path(key) == Path("/proc/sys", *parts)


@pytest.mark.parametrize("key", ["", "net..ip_forward", "net/../../etc/passwd", "/net/ipv4", "a."])
def test_sysctl_key_rejects_bad_keys(key: str) -> None:
    with pytest.raises(SysctlKeyError, match="not a valid key"):
        key_parts(key)


def test_sysctl_normalise_strips_and_collapses_whitespace() -> None:
    assert normalise(" 1\n") == "1"
    assert normalise("32768\t60999\n") == "32768 60999"


def test_sysctl_set_records_original_before_writing(procsys: DictProcSys, tmp_path: Path) -> None:
    path = tmp_path / "state" / "sysctl-originals.json"
    sysctls = Sysctls(procsys, path)
    sysctls.set(FWD, "1")
    sysctls.set(FWD, "1")  # a second set keeps the first original
    assert json.loads(path.read_text()) == {FWD: "0"}
    assert procsys.values[FWD] == "1"
    assert sysctls.original(FWD) == "0"
    assert sysctls.original(RPF) is None
    assert sysctls.managed() == {FWD: "1"}


def test_sysctl_before_meshpi_is_original_or_current(procsys: DictProcSys, tmp_path: Path) -> None:
    sysctls = Sysctls(procsys, tmp_path / "o.json")
    assert sysctls.before_meshpi(FWD) == "0"  # untouched: what it is now
    sysctls.set(FWD, "1")
    assert sysctls.before_meshpi(FWD) == "0"  # changed: what it was
    sysctls.restore(FWD)
    procsys.values[FWD] = "1"  # someone else turns forwarding on
    assert sysctls.before_meshpi(FWD) == "1"


def test_sysctl_originals_survive_a_new_instance(procsys: DictProcSys, tmp_path: Path) -> None:
    path = tmp_path / "originals.json"
    Sysctls(procsys, path).set(FWD, "1")
    Sysctls(procsys, path).set(RPF, "2")
    again = Sysctls(procsys, path)
    assert again.managed() == {FWD: "1", RPF: "2"}
    assert again.original(RPF) == "1"


def test_sysctl_restore_all_newest_first_and_forgets(procsys: DictProcSys, tmp_path: Path) -> None:
    path = tmp_path / "originals.json"
    sysctls = Sysctls(procsys, path)
    sysctls.set(FWD, "1")
    sysctls.set(RPF, "2")
    procsys.writes.clear()
    sysctls.restore_all()
    assert procsys.writes == [(RPF, "1"), (FWD, "0")]
    assert sysctls.managed() == {}
    assert not path.exists()  # nothing left to restore, no state left behind
    sysctls.restore(FWD)  # already restored: nothing to do
    assert procsys.writes == [(RPF, "1"), (FWD, "0")]


def test_sysctl_multi_value_original_is_normalised(procsys: DictProcSys, tmp_path: Path) -> None:
    sysctls = Sysctls(procsys, tmp_path / "o.json")
    sysctls.set("net.ipv4.ip_local_port_range", "40000 50000")
    assert sysctls.original("net.ipv4.ip_local_port_range") == "32768 60999"


def test_sysctl_failed_write_records_nothing(procsys: DictProcSys, tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    procsys.refuse.add(FWD)
    sysctls = Sysctls(procsys, path)
    with pytest.raises(KernelError, match="net.ipv4.ip_forward"):
        sysctls.set(FWD, "7")
    assert sysctls.original(FWD) is None
    assert Sysctls(procsys, path).managed() == {}


def test_sysctl_gone_key_is_skipped_and_restore_forgets_it(procsys: DictProcSys, tmp_path: Path) -> None:
    sysctls = Sysctls(procsys, tmp_path / "o.json")
    sysctls.set(RPF, "2")
    sysctls.set(FWD, "1")
    del procsys.values[RPF]  # the interface was deleted
    assert sysctls.managed() == {FWD: "1"}
    sysctls.restore_all()
    assert sysctls.original(RPF) is None
    assert procsys.values == {FWD: "0", "net.ipv4.ip_local_port_range": "32768\t60999"}


def test_sysctl_restore_all_keeps_going_and_reports_all(procsys: DictProcSys, tmp_path: Path) -> None:
    sysctls = Sysctls(procsys, tmp_path / "o.json")
    sysctls.set(FWD, "1")
    sysctls.set(RPF, "2")
    procsys.refuse.add(RPF)
    with pytest.raises(ExceptionGroup) as info:
        sysctls.restore_all()
    assert [str(e) for e in info.value.exceptions] == [
        "write '1' to sysctl net.ipv4.conf.eth0.100.rp_filter: Invalid argument"
    ]
    assert procsys.values[FWD] == "0"  # restored despite the earlier failure
    assert sysctls.original(RPF) == "1"  # still owed


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b"[1, 2]", b'{"net.ipv4.ip_forward": 0}', b"\xff\xfe"]
)
def test_sysctl_corrupt_originals_names_file_once(
    procsys: DictProcSys, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "originals.json"
    path.write_bytes(content)
    with pytest.raises(OriginalsFileError, match=str(path)) as info:
        Sysctls(procsys, path).managed()
    assert isinstance(info.value, ValueError)
    assert (tmp_path / "originals.json.corrupt").read_bytes() == content
    # The next start (a new instance) works instead of failing the same way.
    assert Sysctls(procsys, path).managed() == {}

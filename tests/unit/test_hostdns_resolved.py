"""HostDns's backend choice and its systemd-resolved path, against an in-memory
resolved (this host runs none: the real one is exercised in tests/image/test_hostdns.py)."""

from __future__ import annotations

import os
from ipaddress import ip_address
from pathlib import Path

import pytest

from appliance.base.net import IPAddress
from appliance.core.hostdns import HostDnsConfig
from appliance.kernel import hostdns
from appliance.kernel.base import KernelError
from appliance.kernel.hostdns import HostDns
from appliance.kernel.resolved import Resolved

CFG = HostDnsConfig("meshpi0", (ip_address("100.64.0.2"),), ("mesh.internal", "fritz.box"), True)


class FakeResolved(Resolved):
    """resolved's per-link settings in memory; `calls` is what resolvectl would have been asked."""

    def __init__(self, upstreams: tuple[IPAddress, ...] = (ip_address("10.77.0.1"),)) -> None:
        super().__init__(Path("/nonexistent"))
        self.links: dict[str, HostDnsConfig] = {}
        self.index = {"meshpi0": 7}
        self.calls: list[str] = []
        self._upstreams = upstreams

    def running(self) -> bool:
        return True

    def upstreams(self) -> tuple[IPAddress, ...]:
        return self._upstreams + tuple(s for cfg in self.links.values() for s in cfg.servers)

    def link_index(self, interface: str) -> int | None:
        return self.index.get(interface)

    def set_link(self, cfg: HostDnsConfig) -> None:
        self.calls.append(f"set {cfg.interface}")
        self.links[cfg.interface] = cfg

    def revert(self, interface: str) -> bool:
        self.calls.append(f"revert {interface}")
        return self.links.pop(interface, None) is not None


@pytest.fixture
def stub_resolv_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The 'default' resolv.conf, here a symlink to resolved's stub, as on the image."""
    path = tmp_path / "resolv.conf"
    os.symlink("/run/systemd/resolve/stub-resolv.conf", path)
    monkeypatch.setattr(hostdns, "RESOLV_CONF", path)
    monkeypatch.setattr(hostdns, "in_other_netns", lambda: False)
    return path


def test_hostdns_resolved_is_used_when_it_owns_resolv_conf(stub_resolv_conf: Path, tmp_path: Path) -> None:
    fake = FakeResolved()
    host = HostDns(tmp_path / "hostdns.json", stub_resolv_conf, fake)
    assert host.backend() == "resolved"
    host.apply(CFG)
    host.apply(CFG)  # the same config on the same link: resolvectl is not asked again
    assert fake.calls == ["set meshpi0"] and fake.links["meshpi0"] == CFG
    assert host.original_servers() == (ip_address("10.77.0.1"),)  # saved before ours was added
    assert os.readlink(stub_resolv_conf) == "/run/systemd/resolve/stub-resolv.conf"  # never touched
    fake.index["meshpi0"] = 8  # the interface was made again: resolved forgot it
    host.apply(CFG)
    assert fake.calls == ["set meshpi0", "set meshpi0"]
    host.restore()
    assert fake.calls[-1] == "revert meshpi0" and not fake.links
    assert not (tmp_path / "hostdns.json").exists()


def test_hostdns_resolved_restore_after_a_crash_from_a_new_process(
    stub_resolv_conf: Path, tmp_path: Path
) -> None:
    fake = FakeResolved()
    HostDns(tmp_path / "hostdns.json", stub_resolv_conf, fake).apply(CFG)
    HostDns(tmp_path / "hostdns.json", stub_resolv_conf, fake).restore()  # `meshpi down`, no agent
    assert not fake.links and fake.calls == ["set meshpi0", "revert meshpi0"]


def test_hostdns_stub_nameserver_file_also_means_resolved(stub_resolv_conf: Path, tmp_path: Path) -> None:
    stub_resolv_conf.unlink()
    stub_resolv_conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\n")
    assert HostDns(tmp_path / "h.json", stub_resolv_conf, FakeResolved()).backend() == "resolved"


def test_hostdns_file_backend_when_resolv_conf_is_not_resolveds(
    stub_resolv_conf: Path, tmp_path: Path
) -> None:
    stub_resolv_conf.unlink()
    stub_resolv_conf.write_text("nameserver 10.77.0.1\n")
    fake = FakeResolved()
    host = HostDns(tmp_path / "h.json", stub_resolv_conf, fake)
    assert host.backend() == "resolv.conf"  # resolved runs, but glibc does not ask it
    host.apply(CFG)
    assert fake.calls == [] and "nameserver 100.64.0.2" in stub_resolv_conf.read_text()
    host.restore()
    assert stub_resolv_conf.read_text() == "nameserver 10.77.0.1\n"


def test_hostdns_resolved_link_missing_is_an_error_naming_it(stub_resolv_conf: Path, tmp_path: Path) -> None:
    fake = FakeResolved()
    fake.index.clear()
    with pytest.raises(KernelError, match="'meshpi0' does not exist"):
        HostDns(tmp_path / "h.json", stub_resolv_conf, fake).apply(CFG)

"""The resolver's wiring (agent/dns/service.py) against a recording server: started
once addresses are applied, updated on each change (and only then), rebound when
the addresses move, stopped on logout; host resolvers read from resolv.conf."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from appliance.agent.bus import Applied
from appliance.agent.dns.server import BindError
from appliance.agent.dns.service import DnsService, host_resolvers, read_host_resolvers
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint
from appliance.core.dns import nameservers
from appliance.core.nft import FirewallPlan, render
from appliance.core.prefs import Prefs
from appliance.wire.netmap import Netmap, parse_netmap
from tests.unit.test_dns_plan import HOST, laptop_view


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __call__(self, binds: Sequence[Endpoint], zone: Zone, upstreams: Upstreams) -> Recorder:
        self.calls.append(("new", tuple(binds)))
        return self

    def start(self) -> None:
        self.calls.append(("start", None))

    def stop(self) -> None:
        self.calls.append(("stop", None))

    def update(self, zone: Zone, upstreams: Upstreams) -> None:
        self.calls.append(("update", (sorted(zone.records), upstreams.default)))

    def rebind(self, binds: Sequence[Endpoint]) -> None:
        self.calls.append(("rebind", tuple(binds)))

    @property
    def bound(self) -> tuple[Endpoint, ...]:
        return ()


def netmap(**pi_extra: Any) -> Netmap:
    return parse_netmap(laptop_view(["0.0.0.0/0", "::/0"], **pi_extra))


def test_dns_service_starts_updates_on_change_only_and_stops_on_logout() -> None:
    server = Recorder()
    service = DnsService(lambda: HOST, server)  # type: ignore[arg-type]
    service.on_applied(Applied(netmap(), Prefs(), 3))
    assert [c[0] for c in server.calls] == ["new", "start"]
    service.on_applied(Applied(netmap(), Prefs(), 0))  # nothing of DNS changed
    assert len(server.calls) == 2
    service.on_applied(Applied(netmap(), Prefs(exit_node="pi"), 1))
    assert server.calls[-1][0] == "update" and server.calls[-1][1][1][0].host == ip_address("100.64.0.1")
    service.on_applied(Applied(netmap(dns_name="home"), Prefs(exit_node="pi"), 1))  # a rename
    assert "home.mesh.internal" in server.calls[-1][1][0]
    status = service.status()
    assert status is not None and status["domain"] == "mesh.internal"
    assert status["upstreams_via"] == "exit node pi"
    service.on_applied(Applied(None, Prefs(), 0))  # logout
    assert server.calls[-1][0] == "stop" and service.status() is None


def test_dns_service_rebinds_when_the_addresses_move() -> None:
    server = Recorder()
    service = DnsService(lambda: HOST, server)  # type: ignore[arg-type]
    service.on_applied(Applied(netmap(), Prefs(), 1))
    doc = laptop_view([])
    doc["self"]["addresses"] = ["100.64.0.20", "fd7a:6d70:6900::20"]
    service.on_applied(Applied(parse_netmap(doc), Prefs(), 1))
    assert server.calls[-2][0] == "rebind" and str(server.calls[-2][1][0]) == "100.64.0.20:53"


def test_dns_service_no_names_no_resolver() -> None:
    server = Recorder()
    doc = laptop_view([])
    del doc["dns"]
    DnsService(lambda: HOST, server).on_applied(Applied(parse_netmap(doc), Prefs(), 1))  # type: ignore[arg-type]
    assert server.calls == []


def test_dns_service_a_failed_bind_is_shown_and_retried() -> None:
    class Refusing(Recorder):
        def start(self) -> None:
            raise OSError(99, "Cannot assign requested address")

    service = DnsService(lambda: HOST, Refusing())  # type: ignore[arg-type]
    service.on_applied(Applied(netmap(), Prefs(), 1))
    assert service.status() == {"serving": [], "error": "[Errno 99] Cannot assign requested address"}


def test_dns_service_a_partial_bind_serves_and_binds_the_rest_at_the_next_apply() -> None:
    class Partial(Recorder):
        def start(self) -> None:
            raise BindError("dns: could not bind [fd7a:6d70:6900::2]:53 (Cannot assign requested address)")

    server = Partial()
    service = DnsService(lambda: HOST, server)  # type: ignore[arg-type]
    service.on_applied(Applied(netmap(), Prefs(), 1))
    status = service.status()
    assert status is not None and "could not bind" in status["error"]
    service.on_applied(Applied(netmap(), Prefs(), 0))
    assert server.calls[-1][0] == "rebind" and service.status()["error"] is None  # type: ignore[index]
    assert [c[0] for c in server.calls].count("new") == 1


def test_dns_service_host_resolvers_from_resolv_conf(tmp_path: Path) -> None:
    conf, resolved = tmp_path / "resolv.conf", tmp_path / "resolved.conf"
    conf.write_text(
        "# dhcp\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\n"
    )
    assert [str(e) for e in read_host_resolvers(conf, resolved)] == ["192.0.2.53:53", "[2001:db8::53]:53"]
    conf.write_text("nameserver 127.0.0.53\noptions edns0\n")  # systemd-resolved's stub
    resolved.write_text("nameserver 10.0.0.1\n")
    assert [str(e) for e in read_host_resolvers(conf, resolved)] == ["10.0.0.1:53"]
    assert read_host_resolvers(tmp_path / "none", resolved) == ()
    saved = host_resolvers(lambda: (ip_address("198.51.100.53"),))
    assert [str(e) for e in saved()] == ["198.51.100.53:53"]
    assert nameservers("nameserver\nnameserver x\n") == ()


def test_dns_service_nft_input_drops_mesh_dns_from_other_interfaces() -> None:
    nm = netmap()
    plan = FirewallPlan("meshpi0", 1280, nm.mesh.ipv4, nm.mesh.ipv6, False, (), (), False,
                        forwarding=False, mesh_dns=True)  # fmt: skip
    text = render(plan)
    assert 'iifname != "meshpi0" ip daddr 100.64.0.0/10 meta l4proto { tcp, udp } th dport 53' in text
    assert 'iifname != "meshpi0" ip6 daddr fd7a:6d70:6900::/48 meta l4proto { tcp, udp } th dport 53' in text
    assert "local_v4" not in text  # no guarded ports: no LAN sets


def test_dns_service_status_text_shows_names_and_where_other_names_go() -> None:
    from appliance.agent.localapi.status import format_status

    st = {
        "agent": "running", "control": {"state": "connected"},
        "self": {"name": "laptop", "addresses": ["100.64.0.2"], "dns_name": "laptop.mesh.internal"},
        "dns": {"domain": "mesh.internal", "serving": ["100.64.0.2:53"], "upstreams": [], "error": None},
        "connected": [
            {"id": "k1", "name": "pi", "kind": "pi", "addresses": ["100.64.0.1"], "state": "online",
             "last_seen": None, "rx_bytes": 0, "tx_bytes": 0, "uses_exit": False, "path": None, "enabled": True,
             "dns_name": "pi.mesh.internal"},
            {"id": "k2", "name": "phone", "kind": "phone", "addresses": ["100.64.0.9"], "state": "never",
             "last_seen": None, "rx_bytes": 0, "tx_bytes": 0, "uses_exit": False, "path": None, "enabled": True,
             "dns_name": "phone.mesh.internal"},
        ],
    }  # fmt: skip
    text = format_status(st)
    assert "dns name: laptop.mesh.internal" in text
    assert "dns: mesh.internal on 100.64.0.2:53; other names to nowhere (fail closed)" in text
    assert "pi.mesh.internal" in text and "phone.mesh.internal" in text

"""The resolver on real sockets: dig and dnspython as clients, dnsmasq as the upstreams."""

from __future__ import annotations

import socket
import time
from ipaddress import ip_address

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from appliance.agent.dns.server import BindError, DnsServer
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint
from tests.dns.conftest import MESH, Dnsmasq, dig, free_port, start_dnsmasq


def ask(
    bind: Endpoint, name: str, rdtype: str = "A", tcp: bool = False, **make: object
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(query, str(bind.host), timeout=3, port=bind.port)
    return dns.query.udp(query, str(bind.host), timeout=3, port=bind.port)


def addresses(answer: dns.message.Message) -> set[str]:
    return {rdata.to_text() for rrset in answer.answer for rdata in rrset}


def test_dns_mesh_names_a_aaaa_ptr_nxdomain_with_dig(server: DnsServer, bind: Endpoint) -> None:
    assert dig(bind, "+short", "pi.mesh.internal").split() == ["100.64.0.1"]
    assert dig(bind, "+short", "PI.Mesh.Internal", "AAAA").split() == ["fd7a:115c:a1e0::1"]
    assert dig(bind, "+short", "phone.devices.mesh.internal").split() == ["100.64.0.3"]
    assert dig(bind, "+short", "-x", "100.64.0.2").split() == ["laptop.mesh.internal."]
    assert dig(bind, "+short", "-x", "fd7a:115c:a1e0::1").split() == ["pi.mesh.internal."]
    nx = dig(bind, "nobody.mesh.internal")
    assert "status: NXDOMAIN" in nx and "flags: qr aa rd ra" in nx
    assert "mesh.internal.\t\t5\tIN\tSOA\tns.mesh.internal. hostmaster.mesh.internal." in nx
    assert dig(bind, "+short", "+tcp", "pi.mesh.internal").split() == ["100.64.0.1"]
    assert server.stats()["answered_local"] == 7


def test_dns_mesh_nodata_for_missing_family_and_empty_nonterminal(server: DnsServer, bind: Endpoint) -> None:
    for name, rdtype in [
        ("laptop.mesh.internal", "AAAA"),
        ("devices.mesh.internal", "A"),
        ("pi.mesh.internal", "MX"),
    ]:
        answer = ask(bind, name, rdtype)
        assert answer.rcode() == dns.rcode.NOERROR and not answer.answer, name
        assert answer.authority[0].rdtype == dns.rdatatype.SOA


def test_dns_mesh_any_is_minimal_and_other_any_refused(server: DnsServer, bind: Endpoint) -> None:
    assert addresses(ask(bind, "pi.mesh.internal", "ANY")) == {"100.64.0.1", "fd7a:115c:a1e0::1"}
    assert ask(bind, "www.example.test", "ANY").rcode() == dns.rcode.REFUSED


def test_dns_tcp_fallback_for_a_large_mesh_answer(server: DnsServer, bind: Endpoint) -> None:
    truncated = dig(bind, "+noedns", "+ignore", "many.mesh.internal")
    assert " tc " in truncated.split("flags:")[1].split(";")[0] + " "
    assert int(truncated.split("MSG SIZE  rcvd: ")[1].split()[0]) <= 512
    full = dig(bind, "+noedns", "+short", "many.mesh.internal")  # dig retries over TCP itself
    assert len(full.split()) == 60
    # With EDNS0 1232 it fits over UDP.
    assert len(ask(bind, "many.mesh.internal", use_edns=0, payload=1232).answer[0]) == 60


@pytest.mark.parametrize("payload", [0, 512, 700, 1232, 4096])
def test_dns_udp_answers_never_exceed_the_clients_edns_size(
    server: DnsServer, bind: Endpoint, payload: int
) -> None:
    for name in ("many.mesh.internal", "big.example.test"):
        query = dns.message.make_query(name, "A", use_edns=0 if payload else False, payload=payload or 512)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            sock.sendto(query.to_wire(), (str(bind.host), bind.port))
            wire = sock.recv(65535)
        assert len(wire) <= max(512, min(payload, 1232)), (name, payload, len(wire))
        reply = dns.message.from_wire(wire)
        assert reply.id == query.id
        if payload == 0:
            assert reply.edns < 0  # no EDNS0 in the answer to a query without it


def test_dns_forwarded_big_answer_over_tcp_upstream_and_to_client(
    server: DnsServer, bind: Endpoint, home: Dnsmasq
) -> None:
    udp = ask(bind, "big.example.test", use_edns=0, payload=1232)
    assert udp.flags & dns.flags.TC and len(addresses(udp)) < 100
    assert len(addresses(ask(bind, "big.example.test", tcp=True))) == 100
    # dnsmasq saw the question over UDP (truncated), then over TCP; the client's TCP retry came from the cache.
    assert len(home.queries("big.example.test")) == 2


def test_dns_forwarding_and_cache_with_ttl_expiry(tmp_path, bind: Endpoint) -> None:  # type: ignore[no-untyped-def]
    upstream = start_dnsmasq(tmp_path, {"tick.example.test": ["192.0.2.1"]}, "test", ttl=1)
    dns_server = DnsServer([bind], MESH, Upstreams(default=(upstream.endpoint,)))
    dns_server.start()
    try:
        first = ask(bind, "tick.example.test")
        assert addresses(first) == {"192.0.2.1"} and first.answer[0].ttl == 1
        assert addresses(ask(bind, "Tick.Example.Test")) == {"192.0.2.1"}
        assert len(upstream.queries("tick.example.test")) == 1
        assert dns_server.stats()["cache_hits"] == 1 and dns_server.stats()["forwarded"] == 1
        # The TTL is one second: well after it, the upstream is asked again.
        deadline = time.monotonic() + 5
        while len(upstream.queries("tick.example.test")) < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
            ask(bind, "tick.example.test")
        assert len(upstream.queries("tick.example.test")) == 2
        # NXDOMAIN from upstream is passed on.
        assert ask(bind, "nothing.example.test").rcode() == dns.rcode.NXDOMAIN
    finally:
        dns_server.stop()
        upstream.process.kill()


def test_dns_fails_closed_without_upstreams(bind: Endpoint, home: Dnsmasq) -> None:
    dns_server = DnsServer([bind], MESH, Upstreams(default=()))
    dns_server.start()
    try:
        assert ask(bind, "www.example.test").rcode() == dns.rcode.SERVFAIL
        assert "status: SERVFAIL" in dig(bind, "www.example.test")
        assert addresses(ask(bind, "pi.mesh.internal")) == {"100.64.0.1"}  # mesh names still work
        # Upstreams come, then go again: the cache of what they said goes with them.
        dns_server.update(MESH, Upstreams(default=(home.endpoint,)))
        assert addresses(ask(bind, "www.example.test")) == {"192.0.2.10"}
        dns_server.update(MESH, Upstreams(default=()))
        assert ask(bind, "www.example.test").rcode() == dns.rcode.SERVFAIL
        assert home.queries() == home.queries("www.example.test") and len(home.queries()) == 1
        assert dns_server.stats()["failed"] == 3
    finally:
        dns_server.stop()


def test_dns_split_domain_goes_to_its_own_resolver(bind: Endpoint, home: Dnsmasq, lan: Dnsmasq) -> None:
    upstreams = Upstreams(default=(home.endpoint,), split={"home.lan": (lan.endpoint,), "x.home.lan": ()})
    dns_server = DnsServer([bind], MESH, upstreams)
    dns_server.start()
    try:
        assert dig(bind, "+short", "nas.home.lan").split() == ["192.168.1.20"]
        assert dig(bind, "+short", "www.example.test").split() == ["192.0.2.10"]
        assert ask(bind, "a.x.home.lan").rcode() == dns.rcode.SERVFAIL  # longest match: fail closed
        assert [q for q in home.queries() if "home.lan" in q] == []
        assert len(lan.queries("nas.home.lan")) == 1 and lan.queries("www.example.test") == []
    finally:
        dns_server.stop()


def test_dns_upstreams_tried_in_order(bind: Endpoint, home: Dnsmasq) -> None:
    silent = Endpoint(ip_address("127.0.0.1"), free_port())  # nothing listens: times out
    dns_server = DnsServer([bind], MESH, Upstreams(default=(silent, home.endpoint)), upstream_timeout=0.3)
    dns_server.start()
    try:
        assert addresses(ask(bind, "short.example.test")) == {"192.0.2.11"}
    finally:
        dns_server.stop()


def test_dns_update_swaps_the_zone_at_once(server: DnsServer, bind: Endpoint) -> None:
    assert addresses(ask(bind, "laptop.mesh.internal")) == {"100.64.0.2"}
    renamed = Zone("mesh.internal", {"notebook.mesh.internal": (ip_address("100.64.0.2"),)})
    server.update(renamed, Upstreams(default=()))
    assert ask(bind, "laptop.mesh.internal").rcode() == dns.rcode.NXDOMAIN
    assert addresses(ask(bind, "notebook.mesh.internal")) == {"100.64.0.2"}
    assert dig(bind, "+short", "-x", "100.64.0.2").split() == ["notebook.mesh.internal."]


def test_dns_rebind_moves_the_listeners(server: DnsServer, bind: Endpoint) -> None:
    other = Endpoint(ip_address("127.0.0.1"), free_port())
    v6 = Endpoint(ip_address("::1"), free_port())
    server.rebind([other, v6])
    assert addresses(ask(other, "pi.mesh.internal")) == {"100.64.0.1"}
    assert addresses(ask(v6, "pi.mesh.internal", tcp=True)) == {"100.64.0.1"}
    with pytest.raises(OSError):
        ask(bind, "pi.mesh.internal", tcp=True)
    assert set(server.bound) == {other, v6}


def test_dns_binds_an_address_not_yet_on_the_host(home: Dnsmasq) -> None:
    # The agent starts the resolver before the mesh address is on the interface (IP_FREEBIND).
    absent = Endpoint(ip_address("100.64.254.254"), free_port())
    dns_server = DnsServer([absent], MESH, Upstreams())
    dns_server.start()
    try:
        assert dns_server.bound == (absent,)
    finally:
        dns_server.stop()


def test_dns_wildcard_bind_refused() -> None:
    with pytest.raises(ValueError, match="no wildcard"):
        DnsServer([Endpoint(ip_address("0.0.0.0"), 53)], MESH, Upstreams())


def test_dns_bind_failure_named_and_the_other_binds_serve(home: Dnsmasq) -> None:
    good = Endpoint(ip_address("127.0.0.1"), free_port())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = Endpoint(ip_address("127.0.0.1"), taken.getsockname()[1])
        dns_server = DnsServer([busy, good], MESH, Upstreams())
        with pytest.raises(BindError, match=str(busy)):
            dns_server.start()
        try:
            assert dns_server.bound == (good,)
            assert addresses(ask(good, "pi.mesh.internal")) == {"100.64.0.1"}
        finally:
            dns_server.stop()


def test_dns_stop_ends_idle_tcp_clients_and_pending_questions(bind: Endpoint) -> None:
    silent = Endpoint(ip_address("127.0.0.1"), free_port())
    dns_server = DnsServer([bind], MESH, Upstreams(default=(silent,)), upstream_timeout=5)
    dns_server.start()
    idle = socket.create_connection((str(bind.host), bind.port), timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(dns.message.make_query("www.example.test", "A").to_wire(), (str(bind.host), bind.port))
        deadline = time.monotonic() + 5
        while dns_server.stats()["forwarded"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        dns_server.stop()
        assert time.monotonic() - started < 2
    assert idle.recv(1) == b""  # the server hung up
    idle.close()

"""The resolver's pure parts: the zone's checks and look-ups, judging queries, answers
and their sizes, the caches, the flood-safe log. No sockets (tests/dns has those)."""

from __future__ import annotations

import logging
from ipaddress import ip_address

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from appliance.agent.dns import answer, server
from appliance.agent.dns.answer import Refused
from appliance.agent.dns.cache import AnswerCache, Packet, PacketCache
from appliance.agent.dns.local import LocalZone
from appliance.agent.dns.zone import Upstreams, Zone
from appliance.base.net import Endpoint

ZONE = Zone(
    "mesh.internal",
    {
        "pi.mesh.internal": (ip_address("100.64.0.1"), ip_address("fd00::1")),
        "laptop.mesh.internal": (ip_address("100.64.0.2"),),
        "phone.devices.mesh.internal": (ip_address("100.64.0.3"),),
        "many.mesh.internal": tuple(ip_address(f"100.65.0.{i}") for i in range(1, 61)),
    },
)
LOCAL = LocalZone.build(ZONE)
HOME = Endpoint(ip_address("100.64.0.9"), 53)
LAN = Endpoint(ip_address("192.168.1.1"), 53)


def query(name: str, rdtype: str = "A", tcp: bool = False, **make: object) -> answer.Query:
    return answer.parse(dns.message.make_query(name, rdtype, **make).to_wire(), tcp)  # type: ignore[arg-type]


def local(name: str, rdtype: str = "A", **make: object) -> dns.message.Message:
    return dns.message.from_wire(LOCAL.answer(query(name, rdtype, **make)))


def refusal(wire: bytes) -> Refused:
    with pytest.raises(Refused) as caught:
        answer.parse(wire, tcp=False)
    return caught.value


@pytest.mark.parametrize(
    ("zone", "match"),
    [
        (lambda: Zone("Mesh.Internal"), "lowercase"),
        (lambda: Zone("mesh.internal."), "trailing dot"),
        (lambda: Zone("mesh..internal"), "bad label"),
        (lambda: Zone("mesh.internal", {"pi.other.internal": ()}), "not under the domain"),
        (lambda: Zone("mesh.internal", {"pi.mesh.internal": ("100.64.0.1",)}), "tuple of IP addresses"),  # type: ignore[dict-item]
        (lambda: Zone("mesh.internal", {"bad name.mesh.internal": ()}), "bad label"),
        (lambda: Upstreams(default=("1.1.1.1",)), "tuple of Endpoint"),  # type: ignore[arg-type]
        (lambda: Upstreams(split={"LAN": ()}), "lowercase"),
    ],
)
def test_dns_zone_refuses_bad_values_naming_them(zone, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        zone()


def test_dns_zone_records_cannot_change_behind_the_server() -> None:
    records = {"pi.mesh.internal": (ip_address("100.64.0.1"),)}
    zone = Zone("mesh.internal", records)
    records["evil.mesh.internal"] = ()
    assert "evil.mesh.internal" not in zone.records


def test_dns_upstreams_longest_split_suffix_wins() -> None:
    upstreams = Upstreams(default=(HOME,), split={"lan": (LAN,), "x.lan": ()})
    assert upstreams.for_name("nas.lan") == (LAN,)
    assert upstreams.for_name("lan") == (LAN,)
    assert upstreams.for_name("a.x.lan") == ()
    assert upstreams.for_name("flan") == (HOME,)  # label-wise, not string-wise
    assert upstreams.for_name("example.com") == (HOME,)


def test_dns_local_a_aaaa_ptr() -> None:
    reply = local("Pi.Mesh.Internal")
    assert reply.flags & dns.flags.AA and reply.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in reply.answer[0]] == ["100.64.0.1"]
    assert reply.answer[0].name.to_text() == "Pi.Mesh.Internal."  # the question's spelling
    assert [r.to_text() for r in local("pi.mesh.internal", "AAAA").answer[0]] == ["fd00::1"]
    assert [r.to_text() for r in local("1.0.64.100.in-addr.arpa", "PTR").answer[0]] == ["pi.mesh.internal."]
    v6 = ip_address("fd00::1").reverse_pointer
    assert [r.to_text() for r in local(v6, "PTR").answer[0]] == ["pi.mesh.internal."]


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode"),
    [
        ("nobody.mesh.internal", "A", dns.rcode.NXDOMAIN),
        ("a.b.nobody.mesh.internal", "AAAA", dns.rcode.NXDOMAIN),
        ("laptop.mesh.internal", "AAAA", dns.rcode.NOERROR),  # NODATA
        ("devices.mesh.internal", "A", dns.rcode.NOERROR),  # an empty non-terminal
        ("mesh.internal", "A", dns.rcode.NOERROR),
        ("pi.mesh.internal", "TXT", dns.rcode.NOERROR),
    ],
)
def test_dns_local_negative_answers_carry_the_soa(name: str, rdtype: str, rcode: dns.rcode.Rcode) -> None:
    reply = local(name, rdtype)
    assert reply.rcode() == rcode and not reply.answer
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert reply.authority[0].name.to_text() == "mesh.internal."


def test_dns_local_is_for_the_zone_and_its_addresses_only() -> None:
    assert LOCAL.serves(query("x.mesh.internal"))
    assert LOCAL.serves(query("3.0.64.100.in-addr.arpa", "PTR"))
    assert not LOCAL.serves(query("9.9.64.100.in-addr.arpa", "PTR"))
    assert not LOCAL.serves(query("mesh.internal.example.com"))
    assert not LOCAL.serves(query("internal"))


@pytest.mark.parametrize(
    ("edns", "payload", "limit"), [(False, 0, 512), (0, 100, 512), (0, 1000, 1000), (0, 4096, 1232)]
)
def test_dns_udp_limit_follows_edns0(edns: object, payload: int, limit: int) -> None:
    assert query("pi.mesh.internal", use_edns=edns, payload=payload).limit == limit
    assert query("pi.mesh.internal", tcp=True, use_edns=edns, payload=payload).limit == 65535


def test_dns_big_local_answer_truncated_to_the_limit() -> None:
    wire = LOCAL.answer(query("many.mesh.internal"))
    assert len(wire) <= 512 and dns.message.from_wire(wire).flags & dns.flags.TC
    fits = dns.message.from_wire(LOCAL.answer(query("many.mesh.internal", use_edns=0, payload=1232)))
    assert not fits.flags & dns.flags.TC and len(fits.answer[0]) == 60
    whole = dns.message.from_wire(LOCAL.answer(query("many.mesh.internal", tcp=True)))
    assert len(whole.answer[0]) == 60


def test_dns_garbage_gets_a_bare_formerr_or_nothing() -> None:
    assert refusal(b"").reply is None and refusal(b"\x12\x34\x01").reply is None
    refused = refusal(b"\x12\x34\x01\x00" + b"\xff" * 20)
    assert refused.kind == "malformed" and refused.reply is not None
    reply = dns.message.from_wire(refused.reply)
    assert reply.id == 0x1234 and reply.rcode() == dns.rcode.FORMERR and len(refused.reply) == 12
    # A response (QR set) is never answered: two resolvers would answer each other forever.
    response = dns.message.make_response(dns.message.make_query("pi.mesh.internal", "A"))
    assert refusal(response.to_wire()).rcode is None


@pytest.mark.parametrize(
    ("build", "kind", "rcode"),
    [
        (lambda q: q.set_opcode(dns.opcode.NOTIFY), "opcode", dns.rcode.NOTIMP),
        (lambda q: q.question.append(q.question[0]), "malformed", dns.rcode.FORMERR),
        (lambda q: q.use_edns(1), "edns-version", dns.rcode.BADVERS),
    ],
)
def test_dns_odd_queries_refused_with_the_right_code(build, kind: str, rcode: dns.rcode.Rcode) -> None:  # type: ignore[no-untyped-def]
    message = dns.message.make_query("pi.mesh.internal", "A")
    build(message)
    refused = refusal(message.to_wire())
    assert (refused.kind, refused.rcode) == (kind, rcode)
    assert refused.reply is not None and dns.message.from_wire(refused.reply).rcode() == rcode


@pytest.mark.parametrize(
    ("labels", "rdtype", "rdclass", "kind"),
    [
        ([b"version", b"bind"], "TXT", "CH", "class"),
        ([b"mesh", b"internal"], "AXFR", "IN", "type"),
        ([b"mesh", b"internal"], "IXFR", "IN", "type"),
        (["bücher".encode(), b"mesh", b"internal"], "A", "IN", "name"),  # raw UTF-8: IDNs travel as xn--
        ([b"a\x00b", b"example", b"com"], "A", "IN", "name"),
        ([b"sp ace", b"example", b"com"], "A", "IN", "name"),
        ([b"a.", b"example", b"com"], "A", "IN", "name"),  # its text would have an empty label
        ([b"a.b", b"example", b"com"], "A", "IN", "name"),  # its text would be a.b.example.com's
        ([b"a\\", b"example", b"com"], "A", "IN", "name"),
    ],
)
def test_dns_classes_types_and_names_refused(
    labels: list[bytes], rdtype: str, rdclass: str, kind: str
) -> None:
    name = dns.name.Name([*labels, b""])
    refused = refusal(dns.message.make_query(name, rdtype, rdclass).to_wire())
    assert (refused.kind, refused.rcode) == (kind, dns.rcode.REFUSED)


def test_dns_idna_names_are_plain_names() -> None:
    assert query("xn--bcher-kva.mesh.internal").name == "xn--bcher-kva.mesh.internal"
    assert local("xn--bcher-kva.mesh.internal").rcode() == dns.rcode.NXDOMAIN


def upstream_answer(rcode: int, answer_ttl: int | None, soa: tuple[int, int] | None) -> dns.message.Message:
    message = dns.message.make_response(dns.message.make_query("www.example.com", "A"))
    message.set_rcode(rcode)
    if answer_ttl is not None:
        message.answer.append(dns.rrset.from_text("www.example.com.", answer_ttl, "IN", "A", "192.0.2.1"))
        message.answer.append(dns.rrset.from_text("www.example.com.", answer_ttl + 100, "IN", "TXT", "x"))
    if soa is not None:
        ttl, minimum = soa
        text = f"ns.example.com. h.example.com. 1 2 3 4 {minimum}"
        message.authority.append(dns.rrset.from_text("example.com.", ttl, "IN", "SOA", text))
    return message


@pytest.mark.parametrize(
    ("rcode", "answer_ttl", "soa", "ttl"),
    [
        (dns.rcode.NOERROR, 300, None, 300),
        (dns.rcode.NXDOMAIN, None, (3600, 60), 60),
        (dns.rcode.NOERROR, None, (30, 60), 30),
        (dns.rcode.NXDOMAIN, None, None, 0),
        (dns.rcode.SERVFAIL, None, None, 0),
    ],
)
def test_dns_cache_ttl_from_records_and_rfc2308(
    rcode: int, answer_ttl: int | None, soa: tuple[int, int] | None, ttl: int
) -> None:
    assert answer.cache_ttl(upstream_answer(rcode, answer_ttl, soa)) == ttl


def test_dns_forwarded_answer_counts_ttls_down_and_takes_the_clients_id() -> None:
    client = query("WWW.example.com")
    reply = dns.message.from_wire(answer.forwarded_answer(client, upstream_answer(0, 300, None), age=42))
    assert reply.id == client.message.id and reply.question[0].name.to_text() == "WWW.example.com."
    assert reply.answer[0].ttl == 258 and reply.flags & dns.flags.RA and not reply.flags & dns.flags.AA
    assert dns.message.from_wire(answer.failure(client)).rcode() == dns.rcode.SERVFAIL


def test_dns_answer_cache_expires_and_stays_bounded() -> None:
    cache: AnswerCache[str] = AnswerCache(size=3)
    message = upstream_answer(0, 10, None)
    cache.put("a", message, now=100.0, ttl=10)
    assert cache.get("a", 109.9) is not None and cache.get("a", 110.0) is None
    cache.put("zero", message, now=100.0, ttl=0)
    assert cache.get("zero", 100.0) is None
    for key in "bcde":
        cache.put(key, message, now=100.0, ttl=10)
    assert len(cache) == 3 and cache.get("b", 100.0) is None and cache.get("e", 100.0) is not None


def test_dns_packet_cache_forgets_other_generations_and_stays_bounded() -> None:
    cache = PacketCache(size=2)
    cache.put((False, b"q1"), Packet(b"a1", "answered_local", 1, until=10.0))
    assert cache.get((False, b"q1"), 5.0, generation=1) is not None
    assert cache.get((True, b"q1"), 5.0, generation=1) is None  # TCP answers are not UDP answers
    assert cache.get((False, b"q1"), 5.0, generation=2) is None
    for i in range(5):
        cache.put((False, bytes([i])), Packet(b"", "cache_hits", 1, until=10.0))
    assert len(cache) == 2
    cache.put((True, b"q" * 600), Packet(b"a", "answered_local", 1, until=10.0))  # a big TCP query
    cache.put((True, b"q2"), Packet(b"a" * 5000, "answered_local", 1, until=10.0))  # a big answer
    assert cache.get((True, b"q" * 600), 5.0, 1) is None and cache.get((True, b"q2"), 5.0, 1) is None


def test_dns_answer_cache_bounded_in_bytes() -> None:
    cache: AnswerCache[int] = AnswerCache(max_bytes=16 * 2048)
    big = upstream_answer(0, 300, None)
    addresses = [f"10.0.0.{i}" for i in range(200)]
    big.answer.append(dns.rrset.from_text_list("big.example.com.", 300, "IN", "A", addresses))
    cache.put(0, big, now=0.0, ttl=300)
    assert cache.get(0, 1.0) is None  # bigger than a 16th of the cache
    small = upstream_answer(0, 300, None)
    for key in range(1000):
        cache.put(key, small, now=0.0, ttl=300)
    assert len(cache) * len(small.to_wire()) <= 16 * 2048 and cache.get(999, 1.0) is not None


def test_dns_refusals_logged_once_a_minute_per_kind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])
    rate_log = server._RateLog()
    with caplog.at_level(logging.INFO, logger="appliance.agent.dns.server"):
        for _ in range(10_000):
            rate_log.note("refused: malformed", ("192.0.2.1", 5353))
        rate_log.note("refused: class", ("192.0.2.1", 5353))
        clock[0] += 61
        rate_log.note("refused: malformed", ("192.0.2.1", 5353))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "9999 more" in lines[2]


def test_dns_server_refuses_wildcard_binds() -> None:
    with pytest.raises(ValueError, match="no wildcard"):
        server.DnsServer([Endpoint(ip_address("::"), 53)], ZONE, Upstreams())


def test_dns_local_zone_remembers_only_its_own_names() -> None:
    zone = LocalZone.build(ZONE)
    for i in range(1000):
        zone.answer(query(f"r{i}.mesh.internal"))
    zone.answer(query("pi.mesh.internal"))
    zone.answer(query("pi.mesh.internal", "AAAA"))
    assert len(zone._rrsets) == 2

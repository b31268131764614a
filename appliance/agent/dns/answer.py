"""Queries in, answers out, without sockets: parse and judge a query, or turn a
(cached) upstream answer into the answer to this query (local.py answers mesh names).

The wire format is dnspython's (records in the order given: its shuffle would draw on
the process-wide random generator for nothing); this module decides only what goes into it and how
big it may be: over UDP never more than the client allows (512 bytes without EDNS0,
its EDNS0 size up to ours otherwise), so the resolver amplifies nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

# What we accept and advertise over UDP: the DNS flag day 2020 size, below common MTUs,
# so an answer is never fragmented.
OUR_PAYLOAD = 1232
TCP_MAX = 65535
# Types that are never a plain question: zone transfers, meta and obsolete types.
_REFUSED_TYPES = frozenset(
    {
        dns.rdatatype.AXFR,
        dns.rdatatype.IXFR,
        dns.rdatatype.OPT,
        dns.rdatatype.TSIG,
        dns.rdatatype.TKEY,
        dns.rdatatype.MAILA,
        dns.rdatatype.MAILB,
    }
)
# The exceptions dnspython raises on a malformed message (its own, and a few builtins
# from deep inside the parsers of individual record types).
PARSE_ERRORS = (dns.exception.DNSException, ValueError, IndexError, KeyError, UnicodeError, OverflowError)


class Refused(Exception):
    """A query answered with an error code (or not at all: rcode None), and why (the kind
    is what the flood-safe log counts)."""

    def __init__(self, kind: str, rcode: dns.rcode.Rcode | None, reply: bytes | None = None) -> None:
        super().__init__(kind)
        self.kind, self.rcode, self.reply = kind, rcode, reply


@dataclass(frozen=True)
class Query:
    message: dns.message.Message
    name: str  # lowercase, no trailing dot ("" for the root)
    qtype: dns.rdatatype.RdataType
    limit: int  # the largest answer this client may get, in bytes

    @property
    def dnssec(self) -> bool:
        return bool(self.message.ednsflags & dns.flags.DO) or bool(self.message.flags & dns.flags.CD)


def udp_limit(message: dns.message.Message) -> int:
    """RFC 6891: 512 without EDNS0; with it the client's size, never below 512, never above ours."""
    if message.edns < 0:
        return 512
    return max(512, min(message.payload, OUR_PAYLOAD))


def _header_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare error answer (header only) to a message too broken to parse; None if the
    header itself is missing or the message is a response (answering responses loops)."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None
    reply = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    reply.flags = dns.flags.QR | (int.from_bytes(wire[2:4], "big") & dns.flags.RD)
    reply.set_opcode(dns.opcode.from_flags(int.from_bytes(wire[2:4], "big")))
    reply.set_rcode(rcode)
    return reply.to_wire()


def _error(message: dns.message.Message, rcode: dns.rcode.Rcode, limit: int) -> bytes:
    reply = dns.message.make_response(message, recursion_available=True, our_payload=OUR_PAYLOAD, pad=0)
    reply.set_rcode(rcode)
    return reply.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)


# Bytes no host name has: the text form would need escapes (a dot or backslash inside a
# label), and such a name would share its text, our cache key, with another name.
_NOT_IN_NAMES = frozenset(b".\\")


def _name_text(name: dns.name.Name) -> str | None:
    """The name as lowercase ASCII, or None if a label holds bytes no DNS name has
    (spaces, control characters, dots or backslashes, raw UTF-8: IDNs travel as xn--
    labels, RFC 5890)."""
    labels = name.labels[:-1] if name.is_absolute() else name.labels
    for label in labels:
        if any(byte <= 0x20 or byte >= 0x7F or byte in _NOT_IN_NAMES for byte in label):
            return None
    return b".".join(labels).decode("ascii").lower()


def parse(wire: bytes, tcp: bool) -> Query:
    """Judge a message from a client: a Query to answer, or Refused (with the reply to send)."""
    try:
        message = dns.message.from_wire(wire)
    except PARSE_ERRORS as e:
        raise Refused("malformed", dns.rcode.FORMERR, _header_reply(wire, dns.rcode.FORMERR)) from e
    if message.flags & dns.flags.QR:
        raise Refused("response", None)
    limit = TCP_MAX if tcp else udp_limit(message)
    if message.opcode() != dns.opcode.QUERY:
        raise Refused("opcode", dns.rcode.NOTIMP, _error(message, dns.rcode.NOTIMP, limit))
    if len(message.question) != 1 or message.answer or message.authority:
        raise Refused("malformed", dns.rcode.FORMERR, _error(message, dns.rcode.FORMERR, limit))
    if message.edns > 0:
        raise Refused("edns-version", dns.rcode.BADVERS, _error(message, dns.rcode.BADVERS, limit))
    question = message.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise Refused("class", dns.rcode.REFUSED, _error(message, dns.rcode.REFUSED, limit))
    if question.rdtype in _REFUSED_TYPES:
        raise Refused("type", dns.rcode.REFUSED, _error(message, dns.rcode.REFUSED, limit))
    name = _name_text(question.name)
    if name is None:
        raise Refused("name", dns.rcode.REFUSED, _error(message, dns.rcode.REFUSED, limit))
    return Query(message, name, question.rdtype, limit)


def refuse(query: Query, kind: str, rcode: dns.rcode.Rcode) -> Refused:
    return Refused(kind, rcode, _error(query.message, rcode, query.limit))


def response(query: Query) -> dns.message.Message:
    """The start of any answer to query: its ID and question, RD and CD as asked, RA, EDNS0 if it had it."""
    reply = dns.message.make_response(query.message, recursion_available=True, our_payload=OUR_PAYLOAD, pad=0)
    reply.flags |= query.message.flags & dns.flags.CD
    return reply


def upstream_query(query: Query) -> dns.message.Message:
    """What we ask an upstream for this query: the lowercase name (one cache entry for
    every spelling), EDNS0 with our size, DNSSEC bits as the client asked."""
    upstream = dns.message.make_query(
        query.name + ".",
        query.qtype,
        use_edns=0,
        payload=OUR_PAYLOAD,
        want_dnssec=bool(query.message.ednsflags & dns.flags.DO),
    )
    upstream.flags |= query.message.flags & dns.flags.CD
    return upstream


def cache_ttl(answer: dns.message.Message) -> int:
    """Seconds an upstream answer may be kept: the least TTL of its records, or for a
    negative answer the SOA's negative TTL (RFC 2308); 0 if it must not be kept."""
    if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return 0
    records = [*answer.answer, *answer.authority]
    if answer.answer:
        return min(rrset.ttl for rrset in records)
    for rrset in answer.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return min(rrset.ttl, int(rrset[0].minimum))
    return 0


def forwarded_answer(query: Query, answer: dns.message.Message, age: int) -> bytes:
    """The answer to this client from an upstream answer received `age` seconds ago:
    the client's question and ID, TTLs counted down, sized to the client's limit."""
    reply = response(query)
    reply.set_rcode(answer.rcode())
    if answer.flags & dns.flags.AD and query.dnssec:
        reply.flags |= dns.flags.AD
    for source, target in (
        (answer.answer, reply.answer),
        (answer.authority, reply.authority),
        (answer.additional, reply.additional),
    ):
        for rrset in source:
            target.append(dns.rrset.from_rdata_list(rrset.name, max(0, rrset.ttl - age), list(rrset)))
    return reply.to_wire(max_size=query.limit, prefer_truncation=True, want_shuffle=False)


def failure(query: Query) -> bytes:
    """SERVFAIL: no upstream, or none answered (fail closed, no fallback)."""
    return _error(query.message, dns.rcode.SERVFAIL, query.limit)

"""Answers from the mesh zone, authoritative. A name's records become dnspython RRsets
once, on the first question for them, not per query: a question spelled in lowercase
(what stub resolvers send) is answered with them as they are."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import dns.flags
import dns.rcode
import dns.rdatatype
import dns.rrset

from appliance.agent.dns.answer import Query, response
from appliance.agent.dns.zone import MESH_TTL, NEGATIVE_TTL, Zone, ZoneIndex, under

_TYPES = {dns.rdatatype.A: "A", dns.rdatatype.AAAA: "AAAA", dns.rdatatype.PTR: "PTR"}


@dataclass(frozen=True)
class LocalZone:
    index: ZoneIndex
    soa: dns.rrset.RRset
    # (owner, A/AAAA/PTR) -> RRset, made on the first question for it (in the server's loop
    # thread): an update of a big mesh costs the agent no dnspython work for names nobody asks.
    _rrsets: dict[tuple[str, dns.rdatatype.RdataType], dns.rrset.RRset] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(cls, zone: Zone) -> LocalZone:
        domain = zone.domain
        serial = zlib.crc32(repr(sorted(zone.records.items())).encode())
        text = f"ns.{domain}. hostmaster.{domain}. {serial} 3600 600 86400 {NEGATIVE_TTL}"
        return cls(
            ZoneIndex.build(zone), dns.rrset.from_text_list(domain + ".", NEGATIVE_TTL, "IN", "SOA", [text])
        )

    def rrset(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        """The zone's records of a type at a name (lowercase owner), or None."""
        found = self._rrsets.get((name, rdtype))
        # Only the zone's own names are remembered: random names asked in a flood are not.
        if found is None and (name in self.index.v4 or name in self.index.ptr):
            found = self._make(name, rdtype)
            if found is not None:
                self._rrsets[name, rdtype] = found
        return found

    def _make(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        index = self.index
        if rdtype == dns.rdatatype.PTR:
            texts = [target + "." for target in index.ptr.get(name, ())]
        elif rdtype == dns.rdatatype.A:
            texts = [str(a) for a in index.v4.get(name, ())]
        else:
            texts = [str(a) for a in index.v6.get(name, ())]
        if not texts:
            return None
        return dns.rrset.from_text_list(name + ".", MESH_TTL, "IN", _TYPES[rdtype], texts)

    def serves(self, query: Query) -> bool:
        """Names under the mesh domain, and the reverse names of its addresses."""
        return under(query.name, self.index.zone.domain) or query.name in self.index.ptr

    def _answer_rrset(self, query: Query, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        rrset = self.rrset(query.name, rdtype)
        owner = query.message.question[0].name
        if rrset is None or owner.labels == rrset.name.labels:
            return rrset
        return dns.rrset.from_rdata_list(owner, rrset.ttl, list(rrset))  # the question's spelling

    def answer(self, query: Query) -> bytes:
        """The answer (serves(query) must hold), with the zone's SOA in the authority
        section of NXDOMAIN and NODATA (RFC 2308: how long to remember the absence)."""
        reply = response(query)
        reply.flags |= dns.flags.AA
        index = self.index
        wanted = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.PTR)
        for rdtype in wanted if query.qtype == dns.rdatatype.ANY else (query.qtype,):
            rrset = self._answer_rrset(query, rdtype) if rdtype in wanted else None
            if rrset is not None:
                reply.answer.append(rrset)
        if query.name == index.zone.domain and query.qtype == dns.rdatatype.SOA:
            reply.answer.append(
                dns.rrset.from_rdata(query.message.question[0].name, self.soa.ttl, self.soa[0])
            )
        elif query.name not in index.nodes and query.name not in index.ptr:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        if not reply.answer and query.name not in index.ptr:
            reply.authority.append(self.soa)
        return reply.to_wire(max_size=query.limit, prefer_truncation=True, want_shuffle=False)

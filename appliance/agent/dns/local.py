"""Answers from the mesh zone, authoritative. The records are turned into dnspython's
RRsets once per zone update, not per query: a question spelled in lowercase (what stub
resolvers send) is answered with them as they are."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import dns.flags
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from appliance.agent.dns.answer import Query, response
from appliance.agent.dns.zone import MESH_TTL, NEGATIVE_TTL, Zone, ZoneIndex, under

_ADDRESS_TYPES = {dns.rdatatype.A: "A", dns.rdatatype.AAAA: "AAAA"}


@dataclass(frozen=True)
class LocalZone:
    index: ZoneIndex
    rrsets: Mapping[tuple[str, dns.rdatatype.RdataType], dns.rrset.RRset]  # (owner, A/AAAA/PTR)
    soa: dns.rrset.RRset

    @classmethod
    def build(cls, zone: Zone) -> LocalZone:
        index = ZoneIndex.build(zone)
        rrsets = {}
        for name in zone.records:
            for rdtype, text in _ADDRESS_TYPES.items():
                addresses = index.v4[name] if rdtype == dns.rdatatype.A else index.v6[name]
                if addresses:
                    rrsets[name, rdtype] = dns.rrset.from_text_list(
                        name + ".", MESH_TTL, "IN", text, [str(a) for a in addresses]
                    )
        for reverse, targets in index.ptr.items():
            rrsets[reverse, dns.rdatatype.PTR] = dns.rrset.from_text_list(
                reverse + ".", MESH_TTL, "IN", "PTR", [t + "." for t in targets]
            )
        domain = zone.domain
        serial = zlib.crc32(repr(sorted(zone.records.items())).encode())
        text = f"ns.{domain}. hostmaster.{domain}. {serial} 3600 600 86400 {NEGATIVE_TTL}"
        soa = dns.rrset.from_text_list(domain + ".", NEGATIVE_TTL, "IN", "SOA", [text])
        return cls(index, rrsets, soa)

    def serves(self, query: Query) -> bool:
        """Names under the mesh domain, and the reverse names of its addresses."""
        return under(query.name, self.index.zone.domain) or query.name in self.index.ptr

    def _rrset(self, query: Query, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        rrset = self.rrsets.get((query.name, rdtype))
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
            rrset = self._rrset(query, rdtype) if rdtype in wanted else None
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
        return reply.to_wire(max_size=query.limit, prefer_truncation=True)

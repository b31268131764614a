"""Pure logic of appliance/kernel/nft.py: the transaction text and reading the digest."""

from __future__ import annotations

import pytest

from appliance.core.model import NftRuleset
from appliance.kernel.base import KernelError
from appliance.kernel.nft import NftFirewall, parse_comment, parse_digest, render
from appliance.kernel.nftdrift import normalise, shape


def test_nft_render_is_one_transaction_with_digest_comment() -> None:
    ruleset = NftRuleset("abc123", "chain forward {\n}")
    assert render(ruleset) == (
        "table inet meshpi {}\n"
        "delete table inet meshpi\n"
        "table inet meshpi {\n"
        '    comment "meshpi:abc123/9e70b3305626"\n'
        "chain forward {\n"
        "}\n"
        "}\n"
    )


def test_nft_render_refuses_digest_that_would_break_the_string() -> None:
    with pytest.raises(ValueError, match="digest"):
        render(NftRuleset('x" ; flush ruleset ; "', ""))


def test_nft_parse_digest_reads_table_comment_only() -> None:
    listing = (
        "table inet meshpi {\n"
        "\tflags dormant\n"
        '\tcomment "meshpi:0123abcd"\n'
        "\tchain forward {\n"
        '\t\tcomment "meshpi:not-this"\n'
        "\t}\n"
        "}\n"
    )
    assert parse_digest(listing) == "0123abcd"


@pytest.mark.parametrize(
    "listing",
    [
        "table inet meshpi {\n}\n",
        'table inet meshpi {\n\tcomment "someone else"\n}\n',
        'table inet meshpi {\n\tchain c {\n\t\tcomment "meshpi:abc"\n\t}\n}\n',
    ],
)
def test_nft_parse_digest_empty_when_no_meshpi_comment(listing: str) -> None:
    assert parse_digest(listing) == ""


def test_nft_missing_binary_is_a_clear_error() -> None:
    fw = NftFirewall(nft="/nonexistent/nft")
    with pytest.raises(KernelError, match=r"nft program \(/nonexistent/nft\) is not installed"):
        fw.replace(NftRuleset.from_text(""))
    with pytest.raises(KernelError, match="not installed"):
        fw.digest()


# What `nft list table` prints for a ruleset core/nft.py renders (trimmed).
LISTED = """table inet meshpi {
\tcomment "meshpi:0631683f19fc8796/abc"
\tset lan_v4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\tauto-merge
\t\telements = { 10.0.0.0/8, 100.64.0.0/10,
\t\t\t     192.168.0.0/16 }
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname "meshpi0" jump from_mesh
\t\tcounter packets 12 bytes 3400 drop comment "not mesh traffic"
\t}

\tchain from_mesh {
\t\tip daddr @lan_v4 counter packets 0 bytes 0 drop comment "the LAN is not shared"
\t}
}
"""
RENDERED = """set lan_v4 {
\ttype ipv4_addr
\tflags interval
\tauto-merge
\telements = { 10.0.0.0/8, 100.64.0.0/10, 192.168.0.0/16 }
}
chain forward {
\ttype filter hook forward priority filter; policy accept;
\tiifname "meshpi0" jump from_mesh
\tcounter drop comment "not mesh traffic"
}
chain from_mesh {
\tip daddr @lan_v4 counter drop comment "the LAN is not shared"
}
"""


def test_nft_shape_of_the_listing_is_the_shape_of_the_ruleset() -> None:
    assert shape(LISTED) == shape(RENDERED)
    rendered = shape(RENDERED)
    assert rendered.chains == (("forward", 2), ("from_mesh", 1)) and rendered.sets == ("lan_v4",)
    assert parse_comment(LISTED) == ("0631683f19fc8796", "abc")


def test_nft_shape_tells_what_was_deleted() -> None:
    no_rule = LISTED.replace('\t\tiifname "meshpi0" jump from_mesh\n', "")
    assert shape(no_rule).difference(shape(RENDERED)) == "chain forward: 1 rules, 2 applied"
    no_chain = LISTED[: LISTED.index("\tchain from_mesh")] + "}\n"
    assert shape(no_chain).difference(shape(RENDERED)) == "chain from_mesh is gone"
    assert shape(no_chain).fingerprint != shape(RENDERED).fingerprint


def test_nft_normalise_ignores_counters_only() -> None:
    assert normalise(LISTED) == normalise(LISTED.replace("packets 12 bytes 3400", "packets 99 bytes 1"))
    assert normalise(LISTED) != normalise(LISTED.replace("192.168.0.0/16", "192.168.0.0/17"))

"""Pure logic of appliance/kernel/nft.py: the transaction text and reading the digest."""

from __future__ import annotations

import pytest

from appliance.core.model import NftRuleset
from appliance.kernel.base import KernelError
from appliance.kernel.nft import NftFirewall, parse_digest, render


def test_nft_render_is_one_transaction_with_digest_comment() -> None:
    ruleset = NftRuleset("abc123", "chain forward {\n}")
    assert render(ruleset) == (
        "table inet meshpi {}\n"
        "delete table inet meshpi\n"
        "table inet meshpi {\n"
        '    comment "meshpi:abc123"\n'
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

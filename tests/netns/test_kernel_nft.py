"""NftFirewall against the real kernel, in a throwaway namespace."""

from __future__ import annotations

import subprocess

import pytest

from appliance.core.model import NftRuleset
from appliance.kernel.base import KernelError
from appliance.kernel.nft import NftFirewall

# Unindented on purpose: the body is pasted into the table as it is.
EXIT_NODE = NftRuleset.from_text(
    """\
set mesh4 {
type ipv4_addr; flags interval;
elements = { 100.64.0.0/10 }
}
chain forward {
type filter hook forward priority filter; policy accept;
ct state established,related accept
iifname "meshpi0" oifname != "meshpi0" accept
iifname "meshpi0" drop
}
chain postrouting {
type nat hook postrouting priority srcnat; policy accept;
ip saddr @mesh4 oifname != "meshpi0" masquerade
}
"""
)
SUBNET_ROUTER = NftRuleset.from_text(
    """\
    chain forward {
        type filter hook forward priority filter; policy drop;
        comment "meshpi:this is a chain comment, not the digest"
        tcp flags syn tcp option maxseg size set rt mtu
        ct state established,related accept
    }
"""
)


def nft(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["nft", *args], input=stdin, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def fw(inside: str) -> NftFirewall:
    return NftFirewall()


def test_nft_digest_none_without_table(fw: NftFirewall) -> None:
    assert fw.digest() is None


def test_nft_replace_creates_table_with_digest(fw: NftFirewall) -> None:
    fw.replace(EXIT_NODE)
    assert fw.digest() == EXIT_NODE.digest
    listing = nft("list", "table", "inet", "meshpi")
    assert f'comment "meshpi:{EXIT_NODE.digest}/' in listing
    assert 'ip saddr @mesh4 oifname != "meshpi0" masquerade' in listing


def test_nft_replace_replaces_the_whole_table(fw: NftFirewall) -> None:
    fw.replace(EXIT_NODE)
    fw.replace(SUBNET_ROUTER)
    assert fw.digest() == SUBNET_ROUTER.digest
    listing = nft("list", "table", "inet", "meshpi")
    assert "postrouting" not in listing and "mesh4" not in listing
    fw.replace(SUBNET_ROUTER)  # same again: fine
    assert fw.digest() == SUBNET_ROUTER.digest


def test_nft_replace_error_keeps_previous_table(fw: NftFirewall) -> None:
    fw.replace(EXIT_NODE)
    before = nft("list", "table", "inet", "meshpi")
    broken = NftRuleset.from_text("chain forward {\n    bogus rule here\n}\n")
    with pytest.raises(KernelError) as info:
        fw.replace(broken)
    message = str(info.value)
    assert message.startswith(f"replace table inet meshpi (digest {broken.digest}):")
    assert "syntax error" in message and "bogus rule here" in message  # nft's own words
    assert nft("list", "table", "inet", "meshpi") == before
    assert fw.digest() == EXIT_NODE.digest


def test_nft_replace_kernel_refusal_leaves_no_table(fw: NftFirewall) -> None:
    # Parses fine, but the kernel refuses the jump: the whole transaction fails.
    broken = NftRuleset.from_text("chain forward {\n    jump nowhere\n}\n")
    with pytest.raises(KernelError, match="nowhere"):
        fw.replace(broken)
    assert fw.digest() is None


def test_nft_digest_empty_for_table_not_made_by_meshpi(fw: NftFirewall) -> None:
    nft("add", "table", "inet", "meshpi")
    assert fw.digest() == ""
    nft("-f", "-", stdin='table inet meshpi { comment "someone else"; }')
    assert fw.digest() == ""
    fw.replace(EXIT_NODE)  # taken over all the same
    assert fw.digest() == EXIT_NODE.digest


def test_nft_delete_and_already_gone(fw: NftFirewall) -> None:
    nft("add", "table", "inet", "other")
    fw.replace(EXIT_NODE)
    fw.delete()
    assert fw.digest() is None
    fw.delete()  # already gone: fine
    assert "table inet other" in nft("list", "tables")  # other tables are left alone

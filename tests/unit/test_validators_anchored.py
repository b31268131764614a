"""Validators match the whole value: `$` also matches before a trailing newline, so a
pattern anchored with it let `pi\\n` through as a name (issue 11, Low 7)."""

from __future__ import annotations

import pytest

from appliance.firstboot.config import parse_hostname
from appliance.wire.fields import parse_ifname, parse_name


@pytest.mark.parametrize("value", ["pi\n", "pi\r\n", "\npi", "pi\n\n", "a" * 63 + "\n"])
def test_validators_name_refuses_a_trailing_newline(value: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        parse_name(value)


@pytest.mark.parametrize("value", ["meshpi0\n", "wg0\n", "-f", "-", "--help", "-meshpi0", ".", ".."])
def test_validators_ifname_refuses_newlines_and_a_leading_dash(value: str) -> None:
    with pytest.raises(ValueError, match="not a valid interface name"):
        parse_ifname(value)


@pytest.mark.parametrize("value", ["meshpi\n", "meshpi\r\n", "kitchen-pi\n"])
def test_validators_firstboot_hostname_refuses_a_trailing_newline(value: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        parse_hostname(value)


def test_validators_still_accept_good_values() -> None:
    assert parse_name("pi") == "pi" and parse_name("a" * 63) == "a" * 63
    assert parse_ifname("meshpi0") == "meshpi0" and parse_ifname("wg-home") == "wg-home"
    assert parse_ifname("_x.1") == "_x.1" and parse_ifname("a" * 15) == "a" * 15
    assert parse_hostname("Kitchen-Pi") == "kitchen-pi"

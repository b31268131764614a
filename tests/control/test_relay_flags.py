"""meshpi-control serve's relay limits as flags: parsed, validated (the flag and the
value named), and carried into the relay's RelayLimits."""

from __future__ import annotations

import pytest

from appliance.control import cli
from appliance.control.relay_limits import RelayLimits, parse_amount


def _limits(*flags: str) -> RelayLimits:
    return cli.relay_limits(cli._parser().parse_args(["serve", *flags]))


def test_relay_flags_default_to_the_relay_limits() -> None:
    assert _limits() == RelayLimits()


def test_relay_flags_set_each_limit_with_suffixes() -> None:
    limits = _limits("--relay-frames-per-s", "250", "--relay-frame-burst", "1k", "--relay-bytes-per-s", "1.5M",
                     "--relay-byte-burst", "250k", "--relay-max-connections", "10k")  # fmt: skip
    assert limits == RelayLimits(frames_per_s=250, frame_burst=1000, bytes_per_s=1_500_000, byte_burst=250_000,
                                 max_connections=10_000)  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--relay-frames-per-s", "0"), ("--relay-frames-per-s", "-3"), ("--relay-bytes-per-s", "lots"),
     ("--relay-bytes-per-s", "nan"), ("--relay-bytes-per-s", "inf"), ("--relay-byte-burst", "1e400"),
     ("--relay-frame-burst", ""), ("--relay-max-connections", "1.5"), ("--relay-max-connections", "0"),
     ("--relay-bytes-per-s", "4 M"), ("--relay-bytes-per-s", "9" * 5000)],
)  # fmt: skip
def test_relay_flags_refuse_bad_values_naming_flag_and_value(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _limits(flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value[:40]!r} is not a positive" in err, err


def test_relay_flags_help_says_what_each_limit_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for words in ("relay limits", "--relay-frames-per-s N", "packets a second per node (default 4000)",
                  "--relay-bytes-per-s N", "--relay-max-connections N", "(default 1024)", "k, M or G suffix"):  # fmt: skip
        assert words in " ".join(out.split()) or words in out, words


def test_relay_limits_refuse_non_numbers() -> None:
    with pytest.raises(ValueError, match="max_connections: True"):
        RelayLimits(max_connections=True)
    with pytest.raises(ValueError, match="bytes_per_s"):
        RelayLimits(bytes_per_s=float("nan"))
    assert parse_amount("4M") == 4_000_000 and parse_amount("10k", whole=True) == 10_000

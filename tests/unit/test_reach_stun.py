"""The agent's discovery loop (appliance/agent/reach/stun.py) with a scripted prober:
which servers it asks, what it keeps, what it logs (once)."""

from __future__ import annotations

import logging
from ipaddress import ip_address

import pytest

from appliance.agent.reach.stun import Discovery, Port, StunDiscovery, discover
from appliance.base.net import Endpoint
from appliance.kernel.stun import StunTimeout

A4, B4, C6 = (Endpoint(ip_address(h), 3478) for h in ("203.0.113.10", "203.0.113.11", "2001:db8::10"))
PORT = Port(51820, 0x51820)


def ep(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    return Endpoint(ip_address(host.strip("[]")), int(port))


class Script:
    """A prober answering from a table {server: endpoint or exception}; records calls."""

    def __init__(self, table: dict[Endpoint, Endpoint | Exception]) -> None:
        self.table, self.calls = table, []  # type: ignore[var-annotated]

    def __call__(self, server: Endpoint, listen_port: int, fwmark: int, timeout: float) -> Endpoint:
        self.calls.append((server, listen_port, fwmark))
        answer = self.table[server]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_reach_stun_discover_both_families_and_same_mapping() -> None:
    probe = Script(
        {A4: ep("198.51.100.1:51820"), B4: ep("198.51.100.1:51820"), C6: ep("[2001:db8:1::2]:51820")}
    )
    d = discover([A4, B4, C6], PORT, probe)
    assert (d.v4, d.v6, d.server_v4, d.server_v6) == (
        ep("198.51.100.1:51820"),
        ep("[2001:db8:1::2]:51820"),
        A4,
        C6,
    )
    assert d.varies_by_destination is False and d.errors == ()
    assert [c[1:] for c in probe.calls] == [(51820, 0x51820)] * 3


def test_reach_stun_discover_symmetric_nat() -> None:
    d = discover([A4, B4], PORT, Script({A4: ep("198.51.100.1:1111"), B4: ep("198.51.100.1:2222")}))
    assert d.varies_by_destination is True


def test_reach_stun_discover_falls_back_to_the_next_server() -> None:
    d = discover([A4, B4], PORT, Script({A4: StunTimeout("no answer from A"), B4: ep("198.51.100.1:51820")}))
    assert d.v4 == ep("198.51.100.1:51820") and d.server_v4 == B4
    assert d.varies_by_destination is None and d.failed == (A4,) and "no answer" in d.errors[0]


def test_reach_stun_discover_control_on_this_node_is_no_second_view_of_the_nat() -> None:
    """Control on this very node answers from loopback: it sees 127.0.0.1, which says
    nothing about the NAT (the image's VM found "symmetric NAT" beside coturn so)."""
    here = Endpoint(ip_address("127.0.0.1"), 3478)
    probe = Script({A4: ep("198.51.100.1:51820"), here: ep("127.0.0.1:51820")})
    for order in ([A4, here], [here, A4]):
        d = discover(order, PORT, probe)
        assert d.v4 == ep("198.51.100.1:51820") and d.server_v4 == A4, order
        assert d.varies_by_destination is None, order
    alone = discover([here], PORT, probe)  # no other server: UDP works, at least
    assert alone.v4 == ep("127.0.0.1:51820") and alone.varies_by_destination is None
    symmetric = discover([here, A4, B4], PORT, Script({here: ep("127.0.0.1:51820"), A4: ep("198.51.100.1:1"),
                                                       B4: ep("198.51.100.1:2")}))  # fmt: skip
    assert symmetric.varies_by_destination is True and symmetric.v4 == ep("198.51.100.1:1")


def test_reach_stun_loop_logs_address_change_and_failures_once(caplog: pytest.LogCaptureFixture) -> None:
    table: dict[Endpoint, Endpoint | Exception] = {A4: ep("198.51.100.1:51820")}
    disc = StunDiscovery(lambda: [A4], lambda: PORT, probe=Script(table))
    seen: list[Discovery] = []
    disc.subscribe(seen.append)
    with caplog.at_level(logging.INFO, logger="appliance.agent.reach.stun"):
        for _ in range(3):
            disc.run_once()
        table[A4] = ep("198.51.100.99:40000")
        for _ in range(3):
            disc.run_once()
        table[A4] = StunTimeout("STUN: no answer (1 ignored)")
        disc.run_once()
        table[A4] = StunTimeout("STUN: no answer (2 ignored)")  # same server failing: no new line
        disc.run_once()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "public IPv4 address of the WireGuard port: 198.51.100.1:51820",
        "public IPv4 address of the WireGuard port: 198.51.100.99:40000 (was 198.51.100.1:51820)",
        "STUN: no answer (1 ignored)",
    ], lines
    assert len(seen) == 8 and disc.last is not None and disc.last.v4 is None


def test_reach_stun_thread_probes_now_when_asked() -> None:
    probe = Script({A4: ep("198.51.100.1:51820")})
    disc = StunDiscovery(lambda: [A4], lambda: PORT, interval=3600, probe=probe).start()
    try:
        first = disc.wait_round(0, 5)
        assert first is not None and first.v4 == ep("198.51.100.1:51820")
        disc.probe_now()
        assert disc.wait_round(1, 5) is not None  # long before the hour is up
        assert len(probe.calls) == 2
    finally:
        disc.close()


def test_reach_stun_nothing_to_do_without_port_or_servers() -> None:
    probe = Script({})
    assert StunDiscovery(lambda: [A4], lambda: None, probe=probe).run_once() is None
    assert StunDiscovery(lambda: [], lambda: PORT, probe=probe).run_once() is None
    assert probe.calls == []


class Flaky:
    """A prober with no answer for its first `misses` calls, then one."""

    def __init__(self, misses: int, answer: Endpoint) -> None:
        self.misses, self.answer, self.calls = misses, answer, 0

    def __call__(self, server: Endpoint, listen_port: int, fwmark: int, timeout: float) -> Endpoint:
        self.calls += 1
        if self.calls <= self.misses:
            raise StunTimeout(f"STUN to {server}: no answer")
        return self.answer


def test_reach_stun_a_round_nobody_answered_is_tried_again_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after the whole interval (an hour here): after RETRY_FIRST, then twice that."""
    monkeypatch.setattr("appliance.agent.reach.stun.RETRY_FIRST", 0.05)
    probe = Flaky(2, ep("198.51.100.1:51820"))
    disc = StunDiscovery(lambda: [A4], lambda: PORT, interval=3600, probe=probe).start()
    try:
        third = disc.wait_round(2, 5)
        assert third is not None and third.v4 == ep("198.51.100.1:51820"), third
        assert probe.calls == 3
        # Answered: back to the interval.
        assert disc.wait_round(3, 0.5) is None and probe.calls == 3
    finally:
        disc.close()

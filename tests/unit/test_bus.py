"""agent/bus.py: what subscribers are told, and when."""

from __future__ import annotations

from appliance.agent.bus import Applied, Bus
from appliance.core.prefs import Prefs


def test_bus_tells_a_late_subscriber_the_last_apply_at_once() -> None:
    """The agent applies the saved netmap before it starts the resolver and
    reachability (boot to exit node ready); they subscribe after, and must still
    learn what the kernel holds."""
    bus = Bus()
    early: list[Applied] = []
    bus.subscribe(early.append)
    assert early == []  # nothing applied yet: nothing to tell
    first, second = Applied(None, Prefs(), 3), Applied(None, Prefs(), 0)
    bus.publish(first)
    late: list[Applied] = []
    bus.subscribe(late.append)
    assert early == [first] and late == [first]
    bus.publish(second)
    assert early == [first, second] and late == [first, second]


def test_bus_a_failing_subscriber_stops_neither_the_others_nor_the_subscribe() -> None:
    bus = Bus()
    bus.publish(Applied(None, Prefs(), 1))

    def broken(_event: Applied) -> None:
        raise RuntimeError("a subscriber's bug")

    bus.subscribe(broken)  # told the last apply; its error is logged, not raised
    seen: list[Applied] = []
    bus.subscribe(seen.append)
    bus.publish(Applied(None, Prefs(), 2))
    assert [e.changes for e in seen] == [1, 2]

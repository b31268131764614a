"""The LocalAPI's pure parts: the route table, the log ring, LAN detection, the
Prometheus text. (The API itself is tested over its socket in tests/netns.)"""

from __future__ import annotations

import logging
from ipaddress import ip_network

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.agent.localapi.server import HTTPError, Request, Response, Router
from appliance.agent.localapi.status import detect_lan, metrics_text
from appliance.agent.logring import LogRing
from appliance.core.model import Connected


def _ok(_request: Request) -> Response:
    return Response({})


def test_localapi_router_matches_whole_paths_and_names_the_methods() -> None:
    r = Router()
    r.add("GET", "/v1/prefs", _ok)
    r.add("PATCH", "/v1/prefs", _ok)
    r.add("DELETE", "/v1/devices/(?P<id>[^/]+)", _ok)
    assert r.resolve("DELETE", "/v1/devices/7")[1] == {"id": "7"}
    for method, path, status, words in (
        ("POST", "/v1/prefs", 405, "/v1/prefs takes GET, PATCH, not POST"),
        ("GET", "/v1/prefs/x", 404, "no such path: /v1/prefs/x"),
        ("DELETE", "/v1/devices/7/x", 404, "no such path"),
    ):
        with pytest.raises(HTTPError) as e:
            r.resolve(method, path)
        assert e.value.status == status and words in e.value.message


def test_logring_keeps_the_last_records_numbered() -> None:
    ring = LogRing(size=500)
    logger = logging.getLogger("test.logring")
    logger.propagate = False
    logger.addHandler(ring)
    logger.setLevel(logging.DEBUG)
    try:
        for i in range(600):
            logger.info("line %d", i)
        logger.debug("not kept: debug")
    finally:
        logger.removeHandler(ring)
    lines = ring.after(0)
    assert len(lines) == 500
    assert [line["seq"] for line in lines] == list(range(101, 601))
    assert lines[-1]["message"] == "line 599" and lines[-1]["level"] == "INFO"
    assert [line["message"] for line in ring.after(598)] == ["line 598", "line 599"]
    assert ring.after(600) == []


def test_detect_lan_takes_the_first_private_ipv4_interface() -> None:
    connected = (
        Connected("eth0", ip_network("192.168.1.0/24")),
        Connected("eth0", ip_network("fd00:1::/64")),
        Connected("eth0", ip_network("2a01:4f8:1::/64")),  # global: not the LAN's to share
        Connected("wlan0", ip_network("10.0.0.0/24")),
    )
    assert detect_lan(connected) == {"interface": "eth0", "prefixes": ["192.168.1.0/24", "fd00:1::/64"]}
    assert detect_lan((Connected("eth0", ip_network("93.184.216.0/24")),)) is None


def test_metrics_text_parses_as_prometheus_text() -> None:
    peer = {"name": 'odd"name\\', "online": True, "rx_bytes": 10, "tx_bytes": 20}
    status = {"peers": [peer], "control": {"state": "connected"}, "led": "ready"}
    families = {f.name: f for f in text_string_to_metric_families(metrics_text(status, 7))}
    samples = {(s.name, tuple(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert samples[("meshpi_rx_bytes_total", (("peer", 'odd"name\\'),))] == 10
    assert samples[("meshpi_tx_bytes_total", (("peer", 'odd"name\\'),))] == 20
    assert samples[("meshpi_changes_applied_total", ())] == 7
    assert samples[("meshpi_control_connected", ())] == 1
    assert samples[("meshpi_led_state", (("state", "ready"),))] == 1
    assert families["meshpi_rx_bytes"].type == "counter" and families["meshpi_peers"].type == "gauge"

"""The agent's relay client gives back the proxy sockets of peers that left (the
relay itself, against a real control, is tests/control/test_relay.py)."""

from __future__ import annotations

import socket

from appliance.agent.reach.relay import RelayClient
from appliance.base.keys import PrivateKey
from appliance.wire.seal import ControlKey, MachineKey
from tests.lab.host import wait_for


def test_relay_client_releases_the_proxies_of_peers_that_left() -> None:
    """A peer removed from the mesh, or rotated to a new key, gives its proxy socket
    back (the soak found one fd kept per peer that left: ~90 in 4 minutes of churn)."""
    client = RelayClient("http://127.0.0.1:9", MachineKey.generate(), ControlKey.generate().public_key(),
                         listen_port=9, backoff=(60, 60))  # fmt: skip
    try:
        keys = [PrivateKey.generate().public_key() for _ in range(3)]
        proxies = [client.endpoint_for(key) for key in keys]
        client.release_others(keys[:1])
        assert client.stats().peers == 1
        assert client.endpoint_for(keys[0]) == proxies[0]  # the one kept is the same proxy

        def closed(port: int) -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(("127.0.0.1", port))  # free again: the proxy's socket is closed
                except OSError:
                    return False
                return True

        wait_for(lambda: all(closed(p.port) for p in proxies[1:]), 5, "the released proxies to close", 0.05)
        assert not closed(proxies[0].port)
    finally:
        client.close()

"""The WireGuardBackend contract, run against each backend on real devices.

Every test body runs in a fresh network namespace (the `inside` fixture), so
wireguard-go started from it lands there. The UAPI socket directory is shared by
all namespaces, hence interface names carry our PID.

The tunnel test draws its own topology:

    ns A                                   ns B
    mpwgA<pid>  10.99.0.1/24 ~~tunnel~~ mpwgB<pid>  10.99.0.2/24
    mpvA<pid> 192.168.241.1/24 ---veth--- mpvB<pid> 192.168.241.2/24
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from appliance.base.keys import PrivateKey, PublicKey
from appliance.base.net import Endpoint
from appliance.core.model import Peer, sorted_networks
from appliance.kernel.base import (
    InterfaceNotFound,
    KernelError,
    WgDevice,
    WgUpdate,
    WireGuardBackend,
)
from appliance.kernel.wireguard import choose_backend
from appliance.kernel.wireguard_uapi import SOCKET_DIR, UapiWireGuard
from tests.lab import netns as ns

TAG = os.getpid() % 10000
IFNAME = f"mpwg{TAG}"
NO_MODULE = "kernel has no wireguard module"
REPO = Path(__file__).resolve().parents[2]


def kernel_wireguard_missing() -> bool:
    """Try `ip link add … type wireguard` in the current namespace."""
    probe = f"mpwgp{TAG}"
    r = subprocess.run(["ip", "link", "add", probe, "type", "wireguard"], capture_output=True, text=True)
    if r.returncode == 0:
        subprocess.run(["ip", "link", "del", probe], check=True)
        return False
    if "Unknown device type" in r.stderr or "not supported" in r.stderr.lower():
        return True
    pytest.fail(f"probing for kernel WireGuard failed for another reason: {r.stderr.strip()}")


def make_backend(name: str) -> WireGuardBackend:
    if name == "kernel" and kernel_wireguard_missing():
        pytest.skip(NO_MODULE)
    return choose_backend(name)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def link_exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete the link; wait until wireguard-go (if any) has removed its socket."""
    where = ["-n", netns] if netns else []
    subprocess.run(["ip", *where, "link", "del", ifname], capture_output=True)
    wait_for(f"{ifname}'s UAPI socket to go", lambda: not (SOCKET_DIR / f"{ifname}.sock").exists())


def wireguard_go_pids(netns: str) -> list[int]:
    def comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    return [pid for pid in ns.pids(netns) if comm(pid) == "wireguard-go"]


def peer(n: int, *nets: str, endpoint: str | None = None, keepalive: int = 0) -> Peer:
    key = PublicKey(n.to_bytes(2, "big") * 16)
    ep = None
    if endpoint is not None:
        host, _, port = endpoint.rpartition(":")
        ep = Endpoint(ip_address(host.strip("[]")), int(port))
    return Peer(key, sorted_networks(ip_network(x) for x in nets), ep, keepalive)


@pytest.fixture(params=["userspace", "kernel"])
def backend(request: pytest.FixtureRequest, inside: str) -> WireGuardBackend:
    return make_backend(request.param)


@pytest.fixture
def wg(backend: WireGuardBackend, inside: str) -> Iterator[str]:
    backend.create(IFNAME)
    try:
        yield IFNAME
    finally:
        delete_link(IFNAME)


def read(backend: WireGuardBackend, ifname: str) -> WgDevice:
    device = backend.read(ifname)
    assert device is not None
    return device


def test_wireguard_create_reads_back_empty(backend: WireGuardBackend, wg: str) -> None:
    device = read(backend, wg)
    assert device.private_key is None
    assert device.fwmark == 0
    assert device.peers == {}


def test_wireguard_create_twice_is_not_an_error(backend: WireGuardBackend, wg: str) -> None:
    backend.create(wg)
    assert read(backend, wg).peers == {}


def test_wireguard_device_fields_read_back(backend: WireGuardBackend, wg: str) -> None:
    key = PrivateKey.generate()
    backend.configure(wg, WgUpdate(private_key=key, listen_port=51999, fwmark=0x4D50))
    device = read(backend, wg)
    assert (device.listen_port, device.fwmark) == (51999, 0x4D50)
    # Both wireguard-go and the kernel store the key Curve25519-clamped, and
    # PrivateKey.generate() does not clamp: the bytes may differ, the key may not.
    assert device.private_key is not None
    assert device.private_key.public_key() == key.public_key()


def test_wireguard_peers_read_back(backend: WireGuardBackend, wg: str) -> None:
    peers = (
        peer(1, "10.1.0.0/16", "10.0.0.1/32", endpoint="192.0.2.1:51820", keepalive=25),
        peer(2, "fd00::/64", "10.0.0.2/32", endpoint="[2001:db8::2]:4500"),
        peer(3, "10.0.0.3/32"),
    )
    backend.configure(wg, WgUpdate(upsert=peers))
    device = read(backend, wg)
    assert device.peers == {p.public_key: p for p in peers}
    assert device.stats[peers[0].public_key].endpoint == peers[0].endpoint
    assert device.stats[peers[0].public_key].last_handshake is None


def test_wireguard_upsert_replaces_allowed_ips(backend: WireGuardBackend, wg: str) -> None:
    backend.configure(wg, WgUpdate(upsert=(peer(1, "10.0.0.1/32", "10.9.0.0/16"),)))
    backend.configure(wg, WgUpdate(upsert=(peer(1, "10.0.0.7/32", keepalive=10),)))
    assert read(backend, wg).peers == {peer(1).public_key: peer(1, "10.0.0.7/32", keepalive=10)}


def test_wireguard_upsert_without_endpoint_keeps_endpoint(backend: WireGuardBackend, wg: str) -> None:
    backend.configure(wg, WgUpdate(upsert=(peer(1, "10.0.0.1/32", endpoint="192.0.2.9:1234"),)))
    backend.configure(wg, WgUpdate(upsert=(peer(1, "10.0.0.2/32"),)))
    got = read(backend, wg).peers[peer(1).public_key]
    assert got == peer(1, "10.0.0.2/32", endpoint="192.0.2.9:1234")


def test_wireguard_remove_peer(backend: WireGuardBackend, wg: str) -> None:
    backend.configure(wg, WgUpdate(upsert=(peer(1, "10.0.0.1/32"), peer(2, "10.0.0.2/32"))))
    backend.configure(wg, WgUpdate(remove=(peer(1).public_key,)))
    assert list(read(backend, wg).peers) == [peer(2).public_key]


def test_wireguard_remove_missing_peer_is_not_an_error(backend: WireGuardBackend, wg: str) -> None:
    backend.configure(wg, WgUpdate(remove=(peer(42).public_key,)))
    assert read(backend, wg).peers == {}


def test_wireguard_missing_interface(backend: WireGuardBackend) -> None:
    assert backend.read("mpwgnone") is None
    with pytest.raises(InterfaceNotFound):
        backend.configure("mpwgnone", WgUpdate(upsert=(peer(1, "10.0.0.1/32"),)))


def test_wireguard_thousand_peers_in_one_call(
    backend: WireGuardBackend, wg: str, record_property: Callable[[str, object], None]
) -> None:
    peers = tuple(
        peer(
            i,
            f"10.{i // 250}.{i % 250}.0/24",
            f"fd00::{i:x}/128",
            endpoint=f"192.0.2.1:{10000 + i}",
        )
        for i in range(1, 1001)
    )
    started = time.perf_counter()
    backend.configure(wg, WgUpdate(private_key=PrivateKey.generate(), upsert=peers))
    configured = time.perf_counter()
    device = read(backend, wg)
    done = time.perf_counter()
    record_property("configure_1000_s", round(configured - started, 3))
    record_property("read_1000_s", round(done - configured, 3))
    assert device.peers == {p.public_key: p for p in peers}


def test_wireguard_userspace_update_is_one_round_trip(
    backend: WireGuardBackend, wg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name != "userspace":
        pytest.skip("the round trip is a UAPI property")
    requests: list[bytes] = []
    real = UapiWireGuard._transact

    def spy(self: UapiWireGuard, ifname: str, request: object) -> list[str]:
        whole = request if isinstance(request, bytes) else b"".join(request)  # type: ignore[arg-type]
        requests.append(whole)
        return real(self, ifname, whole)

    monkeypatch.setattr(UapiWireGuard, "_transact", spy)
    peers = tuple(peer(i, f"10.0.{i}.0/24") for i in range(1, 200))
    UapiWireGuard().configure(wg, WgUpdate(listen_port=51998, upsert=peers, remove=(peer(999).public_key,)))
    assert len(requests) == 1 and requests[0].startswith(b"set=1\n")
    assert requests[0].count(b"set=1") == 1 and requests[0].endswith(b"\n\n")


def test_wireguard_identical_update_is_idempotent(backend: WireGuardBackend, wg: str) -> None:
    update = WgUpdate(
        private_key=PrivateKey.generate(),
        listen_port=51997,
        upsert=(peer(1, "10.0.0.1/32", endpoint="192.0.2.1:1"), peer(2, "fd00::2/128")),
        remove=(peer(3).public_key,),
    )
    backend.configure(wg, update)
    first = read(backend, wg)
    backend.configure(wg, update)
    assert read(backend, wg) == first


def test_wireguard_link_delete_ends_device(backend: WireGuardBackend, wg: str, inside: str) -> None:
    subprocess.run(["ip", "link", "del", wg], check=True)
    wait_for("read() to return None", lambda: backend.read(wg) is None)
    if backend.name == "userspace":
        wait_for("wireguard-go to exit", lambda: not wireguard_go_pids(inside))


def test_wireguard_device_outlives_the_agent(backend: WireGuardBackend, inside: str) -> None:
    # The child inherits our namespace; it creates the device and is killed -9.
    code = (
        "import os, signal\n"
        "from appliance.kernel.wireguard import choose_backend\n"
        f"choose_backend({backend.name!r}).create({IFNAME!r})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    agent = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    try:
        assert agent.returncode == -signal.SIGKILL, agent.stderr
        assert read(backend, IFNAME).peers == {}
    finally:
        delete_link(IFNAME)


def test_wireguard_private_key_never_leaks(
    backend: WireGuardBackend, wg: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = PrivateKey.generate()
    secrets = (key.secret_base64(), key.raw.hex())
    update = WgUpdate(private_key=key, listen_port=51996, upsert=(peer(1, "10.0.0.1/32"),))
    backend.configure(wg, update)
    device = read(backend, wg)
    with pytest.raises(InterfaceNotFound) as missing:
        backend.configure("mpwgnone", update)
    shown = [repr(device), str(device), repr(dict(device.stats)), str(missing.value), caplog.text]
    assert caplog.records  # the change was logged ...
    assert not [s for s in secrets for text in shown if s in text]  # ... without the key


def test_wireguard_listen_port_in_use_is_a_clear_error(backend: WireGuardBackend, wg: str) -> None:
    subprocess.run(["ip", "link", "set", wg, "up"], check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        with pytest.raises(KernelError, match="in use"):
            backend.configure(wg, WgUpdate(listen_port=port))


def test_wireguard_name_taken_in_another_namespace(wg: str, backend: WireGuardBackend) -> None:
    if backend.name != "userspace":
        pytest.skip("only UAPI sockets are shared between namespaces")
    other = f"mpt{os.getpid()}other"
    ns.create(other)
    try:
        with ns.entered(other):
            assert backend.read(wg) is None
            with pytest.raises(KernelError, match="another network namespace"):
                backend.create(wg)
    finally:
        ns.delete(other)


def test_wireguard_auto_prefers_the_kernel_module(inside: str) -> None:
    expected = "userspace" if kernel_wireguard_missing() else "kernel"
    assert choose_backend("auto").name == expected


@pytest.mark.parametrize(
    ("left", "right"), [("userspace", "userspace"), ("kernel", "kernel"), ("userspace", "kernel")]
)
def test_wireguard_tunnel_handshake_and_ping(left: str, right: str) -> None:
    sides = {
        "A": (f"mpt{os.getpid()}wa", f"mpwgA{TAG}", f"mpvA{TAG}", "1", left),
        "B": (f"mpt{os.getpid()}wb", f"mpwgB{TAG}", f"mpvB{TAG}", "2", right),
    }
    keys = {side: PrivateKey.generate() for side in sides}
    backends: dict[str, WireGuardBackend] = {}
    for netns, *_ in sides.values():
        ns.create(netns)
    try:
        (na, _, va, _, _), (nb, _, vb, _, _) = sides["A"], sides["B"]
        ns.run(na, ["ip", "link", "add", va, "type", "veth", "peer", "name", vb, "netns", nb])
        for side, (netns, ifname, veth, host, kind) in sides.items():
            ns.run(netns, ["ip", "addr", "add", f"192.168.241.{host}/24", "dev", veth])
            ns.run(netns, ["ip", "link", "set", veth, "up"])
            with ns.entered(netns):
                backends[side] = make_backend(kind)
                backends[side].create(ifname)
            ns.run(netns, ["ip", "addr", "add", f"10.99.0.{host}/24", "dev", ifname])
            ns.run(netns, ["ip", "link", "set", ifname, "up"])
        for side, other in (("A", "B"), ("B", "A")):
            netns, ifname, _, _, _ = sides[side]
            far = sides[other][3]
            remote = Peer(
                keys[other].public_key(),
                (ip_network(f"10.99.0.{far}/32"),),
                Endpoint(ip_address(f"192.168.241.{far}"), 51820),
            )
            with ns.entered(netns):
                backends[side].configure(ifname, WgUpdate(keys[side], 51820, upsert=(remote,)))

        ns.run(na, ["ping", "-c", "1", "-W", "5", "10.99.0.2"])

        for side, other in (("A", "B"), ("B", "A")):
            netns, ifname, *_ = sides[side]
            with ns.entered(netns):
                stats = read(backends[side], ifname).stats[keys[other].public_key()]
            assert stats.last_handshake is not None and stats.last_handshake > time.time() - 60
            assert stats.rx_bytes > 0 and stats.tx_bytes > 0
    finally:
        for netns, ifname, *_ in sides.values():
            delete_link(ifname, netns)
            ns.delete(netns)

"""Bad input is refused before any kernel change: `meshpi agent` exits 2 with an
error naming the file, field and value, and the namespace is exactly as before.

One namespace per case, with a LAN on eth0 (192.168.77.2/24) like the pi's.
(A peer's route over that LAN is not bad input: it is set aside alone, see
tests/unit/test_conflicts.py and tests/netns/test_lab_routes.py.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab.mesh import meshpi_binary
from tests.netns.kernelstate import sh, snapshot
from tests.unit.meshes import KEYS, netmap_json, node

GOOD_PREFS = {"interface": "mpbad0", "backend": "userspace", "advertise_exit_node": True}


def _good_netmap() -> dict[str, Any]:
    return netmap_json("pi", [node("laptop")], ["0.0.0.0/0", "::/0"])


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target: Any = doc
        *parts, last = path.split(".")
        for part in parts:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value

    return edit


CASES = {
    "bad key": (
        "netmap",
        _set("peers.0.public_key", "bm90LWEta2V5"),
        "peers[0].public_key",
        "'bm90LWEta2V5'",
    ),
    "duplicate address": (
        "netmap",
        _set("peers.0.addresses", ["100.64.0.1"]),
        "peers[0].addresses[0]",
        "'100.64.0.1'",
    ),
    "unknown netmap field": ("netmap", _set("peers.0.colour", "blue"), "peers[0].colour", "'blue'"),
    "invalid JSON": ("netmap", None, "line 1 column", "not valid JSON"),
    "unknown prefs field": ("prefs", _set("exitnode", "pi"), "exitnode", "'pi'"),
    "bad mtu": ("prefs", _set("mtu", 99999), "mtu", "99999"),
}


@pytest.mark.parametrize("case", CASES)
def test_agent_input_rejected_before_any_kernel_change(netns: str, tmp_path: Path, case: str) -> None:
    which, edit, field, value = CASES[case]
    sh("ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh("ip", "-n", netns, "link", "set", "eth0", "up")
    sh("ip", "-n", netns, "addr", "add", "192.168.77.2/24", "dev", "eth0")
    state = tmp_path / "state"
    state.mkdir()
    (state / "node.key").write_text(KEYS["pi"].secret_base64() + "\n")
    (state / "node.key").chmod(0o600)
    docs = {"netmap": _good_netmap(), "prefs": dict(GOOD_PREFS)}
    paths = {k: tmp_path / f"{k}.json" for k in docs}
    for k, doc in docs.items():
        if k == which and edit is not None:
            edit(doc)
        paths[k].write_text(json.dumps(doc))
    if edit is None:
        paths[which].write_text('{"mesh": {"ipv4": "100.64.0.0/10",,}}')
    before = snapshot(netns)

    res = subprocess.run(
        ["ip", "netns", "exec", netns, str(meshpi_binary()), "agent",
         "--netmap", str(paths["netmap"]), "--prefs", str(paths["prefs"]), "--state-dir", str(state),
         "--local-api", str(tmp_path / "local.sock")],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip

    assert res.returncode == 2, res.stderr
    message = res.stderr.strip().splitlines()[-1]
    assert message.startswith(f"meshpi: bad input: {paths[which]}: {field}"), message
    assert value in message, message
    assert snapshot(netns) == before
    assert not (state / "owned.json").exists() and not (state / "sysctl-originals.json").exists()


def test_agent_input_good_files_do_change_the_kernel(netns: str, tmp_path: Path) -> None:
    """The control case: the same harness with good files brings the interface up."""
    state = tmp_path / "state"
    paths = {"netmap": tmp_path / "netmap.json", "prefs": tmp_path / "prefs.json"}
    state.mkdir()
    (state / "node.key").write_text(KEYS["pi"].secret_base64() + "\n")
    paths["netmap"].write_text(json.dumps(_good_netmap()))
    paths["prefs"].write_text(json.dumps(GOOD_PREFS))
    agent = subprocess.Popen(
        ["ip", "netns", "exec", netns, str(meshpi_binary()), "agent",
         "--netmap", str(paths["netmap"]), "--prefs", str(paths["prefs"]), "--state-dir", str(state),
         "--local-api", str(tmp_path / "local.sock")],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert agent.stderr is not None
        for line in agent.stderr:
            if "is up" in line or "took over" in line:
                break
        assert "masquerade" in sh("ip", "netns", "exec", netns, "nft", "list", "table", "inet", "meshpi")
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    res = subprocess.run(
        ["ip", "netns", "exec", netns, str(meshpi_binary()), "down", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr

"""What each process imports at start (issue 14: the agent, control and the web UI
fit a 512 MB Pi Zero 2 W). Each check runs a fresh interpreter: sys.modules of the
test process has everything in it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Heavy modules a process must not import until it uses them.
AGENT_MUST_NOT_LOAD = (
    "pyroute2.ndb",
    "pyroute2.ipdb",
    # IPRoute and generic netlink: an asyncio loop per socket, unittest.mock,
    # multiprocessing, ~3.6 MB (kernel/rtnl.py speaks rtnetlink instead).
    "pyroute2.iproute",
    "pyroute2.netlink.generic",
    "unittest",
    "multiprocessing",
    "sqlite3",
    "gpiozero",
    "aiohttp",
    "cryptography",
    "flask",
)
CONTROL_MUST_NOT_LOAD = ("pyroute2", "gpiozero", "flask", "dns", "psycopg")
WEB_MUST_NOT_LOAD = ("pyroute2", "aiohttp", "gpiozero", "dns", "asyncio", "cryptography")


def loaded(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_footprint_agent_imports_only_what_it_uses() -> None:
    modules = loaded(
        "import appliance.cli, appliance.agent.loop, appliance.kernel.real, appliance.agent.agentlocal"
    )
    assert "appliance.kernel.rtnl" in modules  # (the probe did import the agent's kernel code)
    assert heavy(modules, AGENT_MUST_NOT_LOAD) == []


def test_footprint_control_imports_only_what_it_uses() -> None:
    modules = loaded("import appliance.control.cli, appliance.control.app")
    assert "aiohttp" in modules
    assert heavy(modules, CONTROL_MUST_NOT_LOAD) == []


def test_footprint_web_ui_imports_only_what_it_uses() -> None:
    modules = loaded("import webui.server, webui")
    assert "flask" in modules
    assert heavy(modules, WEB_MUST_NOT_LOAD) == []


def test_footprint_bare_pyroute2_still_serves_its_whole_api() -> None:
    """Code that asks pyroute2 for a name the kernel modules do not import gets it:
    the real __init__ runs then, once."""
    modules = loaded(
        "import appliance.kernel.netlink\n"
        "from pyroute2 import NDB, IPRoute, config\n"
        "import pyroute2\n"
        "assert pyroute2.NetNS and IPRoute and config and NDB"
    )
    assert "pyroute2.ndb.main" in modules


def test_footprint_agent_at_work_still_imports_only_what_it_uses() -> None:
    """What the agent does after start (uplinks and their features for the fast paths,
    conntrack for who uses the exit node, the update slot) loads no heavy module either."""
    modules = loaded(
        "import appliance.kernel.real, appliance.agent.localapi.status\n"
        "from appliance.kernel.offload import KernelOffloads\n"
        "KernelOffloads().uplinks(exclude='meshpi0')\n"
        "from appliance.kernel.wireguard_netlink import NetlinkWireGuard, genl_family_available\n"
        "genl_family_available()\n"
        "from appliance.kernel import conntrack; conntrack.flows()\n"
        "import pyroute2.ethtool.ioctl\n"
        "from appliance.update.state import update_slot\n"
        "update_slot('0.1.0')"
    )
    assert heavy(modules, AGENT_MUST_NOT_LOAD) == []


@pytest.mark.parametrize("name", ["no_such_thing", "__wrapped__"])
def test_footprint_bare_pyroute2_missing_names_are_attribute_errors(name: str) -> None:
    loaded(
        "import appliance.kernel.netlink, pyroute2\n"
        f"try:\n    getattr(pyroute2, {name!r})\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no AttributeError')"
    )


def test_footprint_version_without_importlib_metadata() -> None:
    """The agent's status names its version without loading importlib.metadata
    (about 1.8 MB), and says what importlib.metadata would."""
    from importlib.metadata import version

    from appliance.base.version import installed_version

    for dist in ("meshpi", "pyroute2", "PyNaCl", "typing_extensions", "dnspython"):
        assert installed_version(dist) == version(dist), dist
    assert installed_version("no-such-distribution") is None
    modules = loaded(
        "from appliance.agent.localapi.status import meshpi_version\nassert meshpi_version() != 'unknown'"
    )
    assert "importlib.metadata" not in modules


def test_footprint_traffic_ring_is_narrow_until_a_minute_outgrows_it() -> None:
    """A peer's day of traffic costs 4 bytes a minute and direction; a minute of 4 GiB
    or more widens that direction to 8 bytes, losing nothing; snapshots keep their
    8-byte format either way."""
    from appliance.core.traffic import SLOTS, Ring

    ring = Ring(100)
    ring.add(99, 1, 2)
    assert (ring.rx.itemsize, ring.tx.itemsize) == (4, 4)
    ring.add(100, 5, 2**32)  # one byte over what 4 bytes hold
    assert (ring.rx.itemsize, ring.tx.itemsize) == (4, 8)
    assert ring.series(2, 100) == ([1, 5], [2, 2**32])
    again = Ring.from_json(100, ring.to_json())
    assert again.series(2, 100) == ([1, 5], [2, 2**32])
    assert (again.rx.itemsize, again.tx.itemsize) == (4, 8)
    quiet = Ring(7)
    assert len(base64.b64decode(quiet.to_json()["rx"])) < 8 * SLOTS  # zlib of 8-byte slots
    assert Ring.from_json(7, quiet.to_json()).rx.itemsize == 4


def test_footprint_meshpi_status_json_loads_none_of_the_agent() -> None:
    """`meshpi status --json` (what scripts and the image tier ask): the parser, the
    LocalAPI client and json, not the agent's modules (under emulation its Python start
    was most of a status)."""
    modules = loaded(
        "import appliance.cli as cli, appliance.client.localapi\n"
        "args = cli.build_parser().parse_args(['status', '--json'])\n"
        "class Answer:\n"
        "    def get(self, path):\n"
        "        return {'path': path}\n"
        "assert cli._ask(args, Answer()) == 0"
    )
    assert "appliance.client.localapi" in modules
    assert (
        heavy(modules, ("appliance.agent", "appliance.kernel", "pyroute2", "dns", "nacl", "http.server"))
        == []
    )


def test_footprint_kernel_package_imports_where_pyroute2_is_not_installed() -> None:
    """meshpi-upgrades runs on the system's python3, which has no pyroute2
    (tests/image/test_upgrades_apt.py): making pyroute2's subpackages bare must
    not need pyroute2 to be there. -S: no site-packages, so no pyroute2."""
    repo = str(Path(__file__).resolve().parents[2])
    code = f"import sys; sys.path.insert(0, {repo!r}); import appliance.kernel; assert 'pyroute2' not in sys.modules"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr

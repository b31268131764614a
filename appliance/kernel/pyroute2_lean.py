"""Import pyroute2's submodules without its package `__init__`.

pyroute2 0.9's `__init__` imports every API it has (NDB with sqlite3, IPDB, IPVS,
ipset, nl80211, devlink, plan9, ...) to re-export them: about 6 MB of RSS in a
process that uses `IPRoute`, `WireGuard` and `Conntrack`. On a 512 MB Pi Zero 2 W
the agent's footprint matters (issue 14), so the kernel modules import the
submodules they use after `install()`, which puts pyroute2 in `sys.modules` as a
bare package: its `__path__` is set, its `__init__` has not run.

Nothing is lost for other code in the process: the bare package's `__getattr__`
imports a submodule by that name if there is one (pyroute2's own modules do
`from pyroute2 import config`), and otherwise runs the real `__init__` once, so
`from pyroute2 import NDB` still works wherever it is written.

`pyroute2.ethtool` gets the same treatment: its `__init__` imports the netlink
ethtool API (generic netlink, asyncio, unittest.mock); the agent uses only the
ioctl submodule (offload.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

PACKAGE = "pyroute2"


def install(name: str = PACKAGE) -> None:
    """Make package `name` (pyroute2, or one of its subpackages once pyroute2 is
    bare) a bare package unless it is already imported (then it is the real one,
    and submodule imports work anyway)."""
    if name in sys.modules:
        return
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a subpackage of a pyroute2 that is not installed
        return
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed: the import that follows says so
    package = importlib.util.module_from_spec(spec)
    state = {"initialised": False}

    def getattr_(attribute: str) -> object:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        try:
            return importlib.import_module(f"{name}.{attribute}")
        except ModuleNotFoundError as e:
            if e.name != f"{name}.{attribute}":
                raise
        if not state["initialised"]:
            state["initialised"] = True
            log.debug("%s.%s asked for: running %s's own __init__", name, attribute, name)
            assert spec.loader is not None  # (checked above; mypy does not follow closures)
            spec.loader.exec_module(package)
        try:
            return package.__dict__[attribute]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}") from None

    package.__getattr__ = getattr_  # type: ignore[method-assign]
    sys.modules[name] = package


def bare() -> ModuleType | None:
    """The bare package, if install() made one (for tests)."""
    module = sys.modules.get(PACKAGE)
    return module if module is not None and "IPRoute" not in module.__dict__ else None

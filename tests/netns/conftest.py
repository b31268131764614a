"""Fixtures for the netns tier: real kernel networking in throwaway namespaces."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab import netns as ns

_REQUIRED_TOOLS = ("ip", "nft", "wireguard-go", "wg", "ping")
_counter = itertools.count()


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nft)"
    absent = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} on PATH (./scripts/test installs them)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing()
    for item in items:
        if "tests/netns/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.netns)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, empty network namespace (lo up); removed with its processes afterwards."""
    name = f"mpt{os.getpid()}n{next(_counter)}"
    ns.create(name)
    try:
        yield name
    finally:
        ns.delete(name)


@pytest.fixture
def inside(netns: str) -> Iterator[str]:
    """The test body runs inside a fresh namespace."""
    with ns.entered(netns):
        yield netns

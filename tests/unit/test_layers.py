"""The layers of DESIGN.md, kept by reading the imports (ast, nothing executed).

    base        value types, keys, the error root, safe file writes: imports nothing of ours
    wire        the protocol's schema                          -> base
    core        pure planning                                  -> wire, base
    kernel      the only code that touches the OS              -> core, wire, base
    leds        state -> LED pattern                           -> base
    client      clients of the agent's LocalAPI, no server     -> base
    control     the coordination server                        -> core, wire, base (never agent, kernel)
    firstboot   meshpi.toml on the image                       -> client, core, wire, base
    webui       the dashboard                                  -> client, update, base
    update      release bundles: signed, checked, installed     -> client, base
    agent, cli  the daemon and the commands                    -> anything but webui and firstboot

Every import counts, including those inside functions and under TYPE_CHECKING:
a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "wire": {"base"},
    "core": {"wire", "base"},
    "kernel": {"core", "wire", "base"},
    "leds": {"base"},
    "client": {"base"},
    "control": {"core", "wire", "base"},
    "firstboot": {"client", "core", "wire", "base"},
    "webui": {"client", "update", "base"},  # update: an upload is checked before root sees it
    "update": {"client", "base"},
    "agent": {"base", "wire", "core", "kernel", "leds", "client", "control", "update"},
    "cli": {"base", "wire", "core", "kernel", "leds", "client", "control", "agent", "update"},
}


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "webui":
        return "webui"
    return "base" if parts == ("appliance", "__init__") else parts[1]


def imported_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "webui":
        return "webui"
    if parts[0] == "appliance" and len(parts) > 1:
        return parts[1]
    return None


def arrows(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, "(relative import)"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / "appliance").rglob("*.py"), *(ROOT / "webui").rglob("*.py")])


def broken_arrows(files: list[Path]) -> list[str]:
    broken = []
    for path in files:
        layer = layer_of(path)
        allowed = ALLOWED[layer] | {layer}
        for line, module in arrows(path):
            if module == "(relative import)":
                broken.append(f"{path.relative_to(ROOT)}:{line}: relative import (spell the layer out)")
                continue
            target = imported_layer(module)
            if target is not None and target not in allowed:
                broken.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {module} ({target})")
    return broken


def test_layers_every_module_has_a_known_layer() -> None:
    unknown = {str(p.relative_to(ROOT)) for p in sources() if layer_of(p) not in ALLOWED}
    assert not unknown, f"modules outside any layer of DESIGN.md: {sorted(unknown)}"


def test_layers_no_import_breaks_the_rules() -> None:
    broken = broken_arrows(sources())
    assert not broken, "imports that break the layers:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    ("layer_file", "source", "expected"),
    [
        (
            "appliance/wire/x.py",
            "from appliance.core.model import State\n",
            "wire imports appliance.core.model",
        ),
        (
            "appliance/core/x.py",
            "def f():\n    import appliance.kernel.nft\n",
            "core imports appliance.kernel.nft",
        ),
        ("appliance/control/x.py", "from appliance.agent import loop\n", "control imports appliance.agent"),
        (
            "webui/x.py",
            "from appliance.agent.localapi.server import X\n",
            "webui imports appliance.agent.localapi.server",
        ),
        ("appliance/base/x.py", "from appliance.wire import fields\n", "base imports appliance.wire"),
    ],
)
def test_layers_a_broken_arrow_is_named_with_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layer_file: str, source: str, expected: str
) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    path = tmp_path / layer_file
    path.parent.mkdir(parents=True)
    path.write_text(source)
    broken = broken_arrows([path])
    assert len(broken) == 1 and expected in broken[0] and f"{layer_file}:" in broken[0], broken

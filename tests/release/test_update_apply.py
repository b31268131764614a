"""meshpi-update on this machine, for real: venvs built from bundles of this checkout
(wheels for this host's Python), a real agent run from the switched-to version in a
network namespace, its LocalAPI as the health check; a version whose agent cannot
start is rolled back; a tampered bundle changes nothing. (The image tier does the
same on the Pi's image.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.client.localapi import LocalClient
from appliance.update.bundle import Version, public_key_text, verify_bundle, write_bundle
from appliance.update.install import Layout, install, switch, venv_version
from tests.lab import netns
from tests.unit.meshes import netmap_json, node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace, wireguard-go)")

ROOT = Path(__file__).resolve().parents[2]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(7, 39)))
IFNAME = "mpupd0"


def meshpi_wheel(out: Path, version: str, broken: bool = False) -> Path:
    """A wheel of this checkout as `version`; `broken`: its agent exits at start, after
    writing its state in a form the old version would not know (as a migration would)."""
    src = out / f"src-{version}"
    src.mkdir(parents=True)
    copy = f"tar -C {ROOT} --exclude=./.venv --exclude=./.git --exclude=./out --exclude=./build -cf - . | tar -C {src} -xf -"
    subprocess.run(copy, shell=True, check=True, executable="/bin/bash")
    pyproject = src / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "0.1.0"', f'version = "{version}"', 1))
    if broken:
        cli = src / "appliance/cli/__init__.py"
        cli.write_text(cli.read_text().replace(
            "def _run_agent(args: argparse.Namespace, state: StateDir) -> int:\n",
            "def _run_agent(args: argparse.Namespace, state: StateDir) -> int:\n"
            "    (state.path / 'migrated-by-the-new-version').write_text('format 99')\n"
            "    (state.path / 'node.key').write_text('format 99')\n"
            "    raise SystemExit('broken release')\n",
        ))  # fmt: skip
    dest = out / f"wheel-{version}"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = dest.glob("meshpi-*.whl")
    return wheel


def tamper(bundle: Path, out: Path) -> None:
    """A copy of `bundle` with one byte flipped in the middle of its last wheel."""
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    raw = bytearray(bundle.read_bytes())
    raw[last.offset_data + last.size // 2] ^= 0xFF
    out.write_bytes(bytes(raw))


@dataclass
class Rig:
    tmp: Path
    deps: list[Path]
    layout: Layout
    keys: Path

    def bundle(self, version: str, broken: bool = False) -> Path:
        out = self.tmp / f"meshpi-{version}.bundle"
        wheels = [meshpi_wheel(self.tmp, version, broken), *self.deps]
        write_bundle(out, wheels, Version.parse(version), "host", "host", "2026-12-02T00:00:00Z", KEY)
        return out

    def service(self) -> list[str]:
        """How meshpi-update stops and starts this rig's agent, and which state it keeps."""
        return ["--stop", str(self.tmp / "stop"), "--restart", str(self.tmp / "restart"),
                "--state", str(self.tmp / "state")]  # fmt: skip

    def update(self, bundle: Path, *extra: str) -> tuple[int, dict[str, object], str]:
        cmd = [str(ROOT / ".venv/bin/meshpi-update"), "--versions", str(self.layout.versions),
               "--current", str(self.layout.current), "--keys", str(self.keys),
               "--local-api", str(self.tmp / "local.sock"), "apply", str(bundle), *self.service(),
               "--deadline", "20", *extra]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return done.returncode, json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    def status(self) -> dict[str, object]:
        return LocalClient(self.tmp / "local.sock").get("/v1/status")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("update")
    deps_dir = tmp / "deps"
    env = {**os.environ, "MESHPI_WHEELS_FOR": "host"}
    subprocess.run([str(ROOT / "scripts/wheels"), str(deps_dir)], check=True, env=env, capture_output=True)
    deps = sorted(p for p in deps_dir.glob("*.whl") if not p.name.startswith("meshpi-"))
    keys = tmp / "keys"
    keys.mkdir()
    (keys / "test.pub").write_text(public_key_text(KEY.public_key()) + "\n")
    layout = Layout(tmp / "versions", tmp / "current")
    ns = f"mpupd{os.getpid() % 10000}"
    state = tmp / "state"
    state.mkdir(mode=0o700)
    (tmp / "netmap.json").write_text(json.dumps(netmap_json("pi", [node("laptop")])))
    (tmp / "prefs.json").write_text(json.dumps({"interface": IFNAME, "backend": "userspace"}))
    from tests.netns.agents import state_dir

    state_dir(state, "pi")
    # What the units would do: (re)start the agent the `current` symlink points at.
    (tmp / "restart").write_text(f"""#!/bin/bash
[[ -f {tmp}/agent.pid ]] && kill $(cat {tmp}/agent.pid) 2>/dev/null && sleep 0.5
ip netns exec {ns} {layout.current}/bin/meshpi agent --netmap {tmp}/netmap.json --prefs {tmp}/prefs.json \\
    --state-dir {state} --local-api {tmp}/local.sock >>{tmp}/agent.log 2>&1 &
echo $! > {tmp}/agent.pid
""")
    (tmp / "stop").write_text(f"""#!/bin/bash
[[ -f {tmp}/agent.pid ]] && kill $(cat {tmp}/agent.pid) 2>/dev/null && sleep 0.5
rm -f {tmp}/agent.pid
""")
    for script in ("restart", "stop"):
        (tmp / script).chmod(0o755)
    rig = Rig(tmp, deps, layout, keys)
    # The factory version, as the image installs it: built, switched to, started.
    factory = rig.bundle("0.1.5")
    with factory.open("rb") as f:
        manifest = verify_bundle(f, (KEY.public_key(),), tmp / "staging", None)
    switch(layout, install(layout, tmp / "staging", manifest))
    netns.create(ns)
    try:
        subprocess.run([str(tmp / "restart")], check=True)
        _wait_for(lambda: rig.status().get("version") == "0.1.5", 30, tmp)
        yield rig
    finally:
        if (tmp / "agent.pid").exists():
            pid = int((tmp / "agent.pid").read_text())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            time.sleep(1)
        subprocess.run(["ip", "netns", "exec", ns, str(ROOT / ".venv/bin/meshpi"), "down", "--state-dir", str(state)],
                       capture_output=True)  # fmt: skip
        netns.delete(ns)
        shutil.rmtree(tmp / "versions", ignore_errors=True)


def _wait_for(cond: object, timeout: float, tmp: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if cond():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - the agent is starting
            pass
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s; agent log:\n{(tmp / 'agent.log').read_text()[-2000:]}")


def test_update_apply_switches_to_the_new_version_and_it_runs(rig: Rig) -> None:
    t0 = time.monotonic()
    rc, result, err = rig.update(rig.bundle("0.1.6"))
    assert rc == 0 and result["result"] == "updated", err
    assert result["previous"] == "0.1.5" and result["version"] == "0.1.6"
    st = rig.status()
    assert st["version"] == "0.1.6" and st["interface"] == IFNAME
    assert rig.layout.running() == rig.layout.versions / "0.1.6"
    assert venv_version(rig.layout.versions / "0.1.5") == Version(0, 1, 5), "the rollback target was pruned"
    assert not (rig.tmp / "state.before-update").exists(), "the kept state outlived a good update"
    # The factory's venv got pip from ensurepip (nothing ran before it); this one a copy
    # of the running version's, which installed the wheels and passed `pip check`.
    assert "update: pip copied from 0.1.5" in err, err
    print(f"\n  update 0.1.5 -> 0.1.6 applied and healthy in {time.monotonic() - t0:.1f} s "
          f"(meshpi-update says {result['seconds']:.1f} s)")  # fmt: skip


def _tree(path: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(path)): (p.stat().st_mode, p.read_bytes()) for p in path.rglob("*") if p.is_file()
    }


def test_update_apply_whose_agent_fails_is_rolled_back(rig: Rig) -> None:
    """Switched back, and the state as it was before the update: what the broken
    version wrote there (its own format) is gone, so the old version can read it."""
    before = rig.layout.running()
    state = rig.tmp / "state"
    (state / "traffic-marker").write_text("written by 0.1.x before the update")
    kept = _tree(state)
    rc, result, err = rig.update(rig.bundle("0.1.7", broken=True))
    assert rc == 3 and result["result"] == "rolled back", err
    assert "0.1.7" in str(result["reason"]) or "does not answer" in str(result["reason"])
    assert rig.layout.running() == before
    _wait_for(lambda: rig.status().get("version") == before.name, 30, rig.tmp)  # type: ignore[union-attr]
    last = json.loads((rig.layout.versions / "last-update.json").read_text())
    assert last["result"] == "rolled back"
    assert "broken release" in (rig.tmp / "agent.log").read_text()  # it ran, and wrote its state
    running = ("traffic.json", "agent.pid")  # the old agent runs again, and writes these
    now = {k: v for k, v in _tree(state).items() if k not in running}
    assert not (state / "migrated-by-the-new-version").exists(), "the broken version's state stayed"
    assert now == {k: v for k, v in kept.items() if k not in running}
    assert (state.stat().st_mode & 0o777) == 0o700
    assert (
        not state.with_name("state.before-update").exists()
        and not state.with_name("state.failed-update").exists()
    )
    print(f"\n  rollback of a broken 0.1.7 took {result['seconds']:.1f} s (deadline 20 s)")


def test_update_apply_refuses_tampered_and_replayed_bundles_and_changes_nothing(rig: Rig) -> None:
    before = rig.layout.running()
    # The version check comes before the wheels: --force, so the tampered wheel is what refuses.
    with tarfile.open(rig.tmp / "meshpi-0.1.6.bundle") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    tampered = rig.tmp / "tampered.bundle"
    info, data = members[2]
    with tarfile.open(tampered, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d if m is not info else d[:-10] + b"0123456789"))
    rc, result, err = rig.update(tampered, "--force")
    assert rc == 1 and result["result"] == "refused" and "SHA-256" in str(result["reason"]), err
    rc, result, err = rig.update(rig.tmp / "meshpi-0.1.5.bundle")
    assert rc == 1 and "older than the installed" in str(result["reason"]), err
    assert rig.layout.running() == before
    assert rig.status()["version"] == before.name  # type: ignore[union-attr]


def test_update_spool_refuses_a_tampered_upload_and_changes_nothing(rig: Rig) -> None:
    """`meshpi-update spool`, what root's meshpi-update.service runs for a dashboard upload:
    the file is taken out of the spool and checked again; a tampered one is refused."""
    before = rig.layout.running()
    good = rig.tmp / "meshpi-0.1.8.bundle"
    if not good.exists():
        rig.bundle("0.1.8")
    spool = rig.tmp / "spool"
    spool.mkdir(exist_ok=True)
    tamper(good, spool / "upload.bundle")
    cmd = [str(ROOT / ".venv/bin/meshpi-update"), "--versions", str(rig.layout.versions),
           "--current", str(rig.layout.current), "--keys", str(rig.keys),
           "--local-api", str(rig.tmp / "local.sock"), "spool", "--spool", str(spool),
           *rig.service(), "--deadline", "20"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 1 and result["result"] == "refused", done.stderr
    assert "SHA-256" in str(result["reason"]) or "truncated" in str(result["reason"]), result
    assert not (spool / "upload.bundle").exists() and not (rig.layout.versions / ".upload.bundle").exists()
    assert not (rig.layout.versions / "progress.json").exists()
    assert rig.layout.running() == before and not (rig.layout.versions / "0.1.8").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and json.loads(done.stdout.strip().splitlines()[-1]) == {
        "result": "nothing to do"
    }


def test_update_check_fetches_a_newer_bundle_and_applies_it(rig: Rig) -> None:
    """`meshpi-update check` (root's daily timer) with an update URL: the newer bundle is
    downloaded from a loopback HTTP server, checked, applied and healthy."""
    from tests.release.test_update_fetch import Server

    bundle = rig.bundle("0.1.9")
    server = Server()
    server.routes["/latest.bundle"] = (bundle.read_bytes(), None)
    try:
        available = rig.tmp / "update-state" / "available.json"
        cmd = [str(ROOT / ".venv/bin/meshpi-update"), "--versions", str(rig.layout.versions),
               "--current", str(rig.layout.current), "--keys", str(rig.keys),
               "--local-api", str(rig.tmp / "local.sock"), "check", "--url", f"{server.url}/latest.bundle",
               "--available", str(available), *rig.service(), "--deadline", "30"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert done.returncode == 0 and result["result"] == "updated" and result["version"] == "0.1.9", (
            done.stderr
        )
        assert rig.status()["version"] == "0.1.9"
        assert json.loads(available.read_text())["version"] == "0.1.9"
        assert not (available.parent / "download.bundle").exists()
        # The next night: nothing new.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert json.loads(done.stdout.strip().splitlines()[-1])["result"] == "up to date", done.stderr
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()

"""The SD-card image, built and booted for real under qemu-system-aarch64.

Slow and heavy (a cold build takes ~20 min of emulated dpkg; with the rootfs cached,
the whole tier takes ~12 min), so it only runs when asked:

    MESHPI_IMAGE_TESTS=1 ./scripts/test tests/image      # as root

One throwaway copy of the image, made 1 GiB bigger (a bigger card), boots twice (the
fixtures, shared by every file here, are in conftest.py):

1. with a BAD meshpi.toml, the self-test (meshpi.imgtest) and the test disk from
   image/imgtest/make-disk: first boot grows the root file system and makes the SSH
   host keys, reports the bad file and boots on; the kernel WireGuard contract tests
   run inside the VM; everything is judged from the console log, then it powers off.
2. with the file fixed (mode = "create", an SSH key), on a tap device in a network
   namespace (tests/image/vmnet.py): first boot applies the file this time, and the
   test logs in over SSH, checks the agent, kernel WireGuard, nft and the web UI, and
   makes a client outside the VM (wireguard-go + the meshpi agent) join the VM's mesh
   and reach a server through the VM as its exit node.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.image.machine import (
    ADMIN_PASSWORD,
    HOSTNAME,
    REPO,
    ROOT_OFFSET,
    TIMINGS,
    WIFI_PASSWORD,
    Boot,
    Vm,
    run,
)
from tests.image.vmnet import CLIENT_V4, SERVER_V4, VM_V4
from tests.lab.host import LabError, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("MESHPI_IMAGE_TESTS") != "1",
    reason="builds and boots the arm64 image under qemu (minutes to ~30 min): "
    "set MESHPI_IMAGE_TESTS=1 and run as root to enable",
)


# -- boot 1: a bad meshpi.toml, self-test, contract tests -------------------------------


def test_image_boots_runs_selftest_and_powers_off(first_boot: Boot) -> None:
    lines = first_boot.lines()
    assert first_boot.result["boot_to_ready_s"] is not None, lines or first_boot.console[-3000:]
    assert first_boot.result["powered_off"] is True, lines
    assert first_boot.returncode == 0, first_boot.result
    assert "MESHPI-IMGTEST: PASS" in lines, lines


def test_image_units_have_no_ordering_cycle(first_boot: Boot) -> None:
    # systemd "breaks" a cycle by dropping a job, e.g. the dashboard's socket.
    cycles = [line for line in first_boot.console.splitlines() if "ordering cycle" in line]
    assert not cycles, "\n".join(cycles)


def test_image_has_kernel_wireguard(first_boot: Boot) -> None:
    lines = first_boot.lines()
    assert "MESHPI-IMGTEST: ok   modprobe wireguard" in lines, lines
    assert "MESHPI-IMGTEST: ok   ip link add wgt0 type wireguard" in lines, lines


def test_image_kernel_contract_tests_pass_without_skips(first_boot: Boot) -> None:
    lines = first_boot.lines()
    found = re.search(
        r"MESHPI-IMGTEST: contract: passed=(\d+) failed=(\d+) errors=(\d+) skipped=(\d+)", lines
    )
    assert found, lines
    passed, failed, errors, skipped = map(int, found.groups())
    outcomes = "\n".join(re.findall(r"pytest: (?:FAILED|ERROR|SKIPPED) .*", first_boot.console))
    assert passed > 0, lines
    assert (failed, errors, skipped) == (0, 0, 0), f"{lines}\n{outcomes}"


def test_image_bad_meshpi_toml_is_reported_and_the_boot_goes_on(first_boot: Boot) -> None:
    facts, console = first_boot.facts(), first_boot.console
    # On the console (the unit's output goes there and to the journal), naming field and value.
    assert "meshpi-firstboot: ERROR: nothing in /boot/firmware/meshpi.toml was applied" in console
    assert "wifi.country: 'Germany' is not a two-letter country code" in console
    report = json.loads(facts["firstboot_json"])
    assert report["ok"] is False and report["applied"] == [], report
    assert "wifi.country: 'Germany'" in report["errors"][0], report
    assert ADMIN_PASSWORD not in console and WIFI_PASSWORD not in console
    # Nothing applied; checked again next boot; everything else came up.
    assert facts["firstboot_done"] == "no"
    assert facts["hostname"] == "meshpi"
    assert facts["multi_user"] == "active"
    assert facts["failed_units"] == "meshpi-firstboot.service", facts
    assert facts["active.meshpi-agent.service"] == "active"
    assert facts["active.ssh.service"] == "inactive"  # no key: SSH stays off


def test_image_root_file_system_grows_to_fill_the_card(first_boot: Boot) -> None:
    facts = first_boot.facts()
    disk, end, fs = int(facts["disk_mib"]), int(facts["root_partition_end_mib"]), int(facts["rootfs_mib"])
    assert disk == 2048 + 1024, facts  # the 2 GiB image on a card 1 GiB bigger
    assert end == disk, facts
    assert fs > 0.9 * (disk - 512), facts  # was ~1.5 GiB (ext4 keeps a few % for itself)
    assert facts["active.meshpi-grow-rootfs.service"] == "active"


def test_image_ssh_host_keys_are_made_on_first_boot_not_baked_in(first_boot: Boot, image: Path) -> None:
    assert "ssh_host_ed25519_key" in first_boot.facts()["ssh_host_keys"].split(","), first_boot.facts()
    listing = run(["debugfs", "-R", "ls -l /etc/ssh", f"{image}?offset={ROOT_OFFSET}"], timeout=60)
    assert listing.returncode == 0 and "sshd_config" in listing.stdout, listing.stderr
    assert "ssh_host_" not in listing.stdout, listing.stdout


def test_image_runs_only_what_it_needs(first_boot: Boot) -> None:
    facts = first_boot.facts()
    enabled = set(facts["enabled"].split(","))
    for unit in ("meshpi-agent.service", "meshpi-firstboot.service", "meshpi-firstboot-mesh.service",
                 "meshpi-grow-rootfs.service", "meshpi-ssh-keygen.service", "avahi-daemon.service",
                 "systemd-networkd.service", "systemd-timesyncd.service",
                 # Debian's security updates (prefs.auto_upgrades, on by default)
                 "apt-daily.timer", "apt-daily-upgrade.timer", "meshpi-upgrades.path"):  # fmt: skip
        assert unit in enabled, sorted(enabled)
    web_units = ("meshpi-web.socket", "meshpi-password-reset.service", "meshpi-setup-code.service",
                 "meshpi-update.path")  # fmt: skip
    for unit in web_units:  # the web UI's, when it has them
        shipped = list((REPO / "image/overlay").rglob(unit))
        assert unit in enabled or not shipped, sorted(enabled)
    for unit in ("ssh.service", "meshpi-control.service", "wpa_supplicant.service", "sshd-keygen.service"):
        assert unit not in enabled, sorted(enabled)
    for unit in ("avahi-daemon.service", "systemd-timesyncd.service", "systemd-networkd.service"):
        assert facts[f"active.{unit}"] == "active", facts
    assert int(facts["journal_files_in_ram"]) > 0 and facts["journal_files_on_card"] == "0", facts
    assert facts["watchdog"] == "10s", facts  # within bcm2835_wdt's 15 s
    assert facts["group_meshpi"] == "meshpi:meshpi-web", facts


@pytest.mark.skipif(not (REPO / "image/overlay/etc/systemd/system/meshpi-web.socket").exists(),
                    reason="no meshpi-web.socket in image/overlay yet")  # fmt: skip
def test_image_web_ui_answers_on_port_80(first_boot: Boot) -> None:
    facts = first_boot.facts()
    assert facts["active.meshpi-web.socket"] == "active", facts
    assert facts["http_status"] in ("200", "302", "303"), facts


# -- boot 2: the file fixed; a client outside the VM uses it as its exit node -----------


def test_image_fixed_meshpi_toml_is_applied_and_forgets_its_secrets(vm: Vm) -> None:
    report = json.loads(vm.out("cat /var/lib/meshpi/firstboot.json"))
    assert report["ok"] is True and report["done"] is True, report
    applied = "\n".join(report["applied"])
    for what in (f"hostname {HOSTNAME}", "Wi-Fi 'home' in DE", "SSH: 1 key(s) for root", "admin password",
                 "created a new mesh", "offered exit node; LAN 10.99.0.0/24; endpoint 10.99.0.2:51820"):  # fmt: skip
        assert what in applied, applied
    assert vm.out("hostname") == HOSTNAME
    toml = vm.out("cat /boot/firmware/meshpi.toml")
    assert ADMIN_PASSWORD not in toml and WIFI_PASSWORD not in toml, toml
    assert "# password = (applied on the first boot; removed)" in toml, toml
    wpa = vm.out(
        "stat -c %a /etc/wpa_supplicant/wpa_supplicant-wlan0.conf; cat /etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    )
    assert wpa.startswith("600\n") and "country=DE" in wpa and WIFI_PASSWORD not in wpa, wpa
    assert (
        vm.ssh(
            "test -e /var/lib/meshpi/firstboot.done && test ! -e /var/lib/meshpi/firstboot-mesh.json"
        ).returncode
        == 0
    )
    assert vm.out("systemctl is-enabled ssh.service") == "enabled"


def test_image_second_boot_has_no_ordering_cycle(vm: Vm) -> None:
    cycles = [line for line in vm.log.read_text(errors="replace").splitlines() if "ordering cycle" in line]
    assert not cycles, "\n".join(cycles)


def test_image_agent_runs_kernel_wireguard(vm: Vm) -> None:
    assert vm.out("systemctl is-active meshpi-agent.service") == "active"
    link = vm.out("ip -d link show meshpi0")
    assert "wireguard" in link, link
    assert vm.ssh("pgrep -x wireguard-go", check=False).returncode == 1  # no userspace WireGuard
    assert "meshpi0" in vm.out(
        "ls /sys/module/wireguard/holders 2>/dev/null; ip -br link show type wireguard"
    )


def test_image_exit_node_nft_table_masquerades(vm: Vm) -> None:
    table = vm.out("nft list table inet meshpi")
    assert "masquerade" in table, table


def test_image_control_runs_because_the_mesh_was_created_here(vm: Vm) -> None:
    assert vm.out(
        "systemctl is-enabled meshpi-control.service; systemctl is-active meshpi-control.service"
    ) == ("enabled\nactive")


def test_image_agent_runs_sandboxed_with_its_four_capabilities(
    vm: Vm, capsys: pytest.CaptureFixture[str]
) -> None:
    """meshpi-agent.service's bounding set, NoNewPrivileges and read-only system hold
    on the running agent, and cost it nothing: the tests around this one (kernel
    WireGuard, the exit node's nft table, control started by create-mesh, the LocalAPI,
    the client using the VM as exit node) all run against the sandboxed agent."""
    assert vm.out("systemctl is-active meshpi-agent.service") == "active"
    pid = vm.out("systemctl show -p MainPID --value meshpi-agent.service")
    status = dict(
        line.split(":", 1) for line in vm.out(f"cat /proc/{pid}/status").splitlines() if ":" in line
    )
    # CAP_CHOWN (0), CAP_DAC_READ_SEARCH (2), CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13)
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 0x3405, status
    assert status["NoNewPrivs"].strip() == "1"
    mounts = vm.out(f"cat /proc/{pid}/mountinfo")
    assert any(
        line.split()[4] == "/" and "ro" in line.split()[5].split(",") for line in mounts.splitlines()
    ), mounts
    journal = vm.out("journalctl -b -u meshpi-agent.service --no-pager -o cat")
    for bad in ("Read-only file system", "Operation not permitted", "Permission denied", "Traceback"):
        assert bad not in journal, journal
    score = vm.out("systemd-analyze security --no-pager meshpi-agent.service | tail -1")
    TIMINGS["agent_exposure"] = float(re.findall(r"([0-9.]+) \w+", score)[-1])
    with capsys.disabled():
        print(f"\n  in the VM: {score}")
    assert TIMINGS["agent_exposure"] <= 3.2, score


_CONNECT_PROBE = """import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except OSError:
    print("closed")
"""


def test_image_input_policy_keeps_dashboard_and_ssh_off_the_internet(vm: Vm) -> None:
    """The image's prefs guard port 80 (LAN only) and 22 (LAN and mesh). From the
    server's network (203.0.113.0/24, "the internet" behind the VM's router) the
    dashboard and SSH do not answer; control's node API on 8080 does. The LAN side
    (ssh from the router, the dashboard from the client's 10.98.0.0/24) is the rest of
    this file."""
    table = vm.out("nft list table inet meshpi")
    assert "tcp dport 80 jump dashboard" in table and "tcp dport 22 jump ssh" in table, table
    for port, want in ((80, "closed"), (22, "closed"), (8080, "open")):
        got = vm.net.server.run(
            ["python3", "-c", _CONNECT_PROBE, VM_V4, str(port)], timeout=30
        ).stdout.strip()
        assert got == want, f"{VM_V4}:{port} from the internet: {got}"


@pytest.mark.skipif(not (REPO / "image/overlay/etc/systemd/system/meshpi-web.socket").exists(),
                    reason="no meshpi-web.socket in image/overlay yet")  # fmt: skip
def test_image_web_ui_answers_from_the_lan_with_the_first_boot_password(vm: Vm) -> None:
    """The dashboard on port 80 from another host, and meshpi.toml's admin_password
    (set by first boot through `meshpi-web passwd`) logs in."""
    status = vm.net.client.run(
        ["python3", "-c", LOGIN_PROBE, VM_V4, ADMIN_PASSWORD], timeout=90
    ).stdout.split()
    assert status[:2] == ["200", "302"], status  # the login page, then a redirect into the dashboard
    wrong = vm.net.client.run(
        ["python3", "-c", LOGIN_PROBE, VM_V4, "not-the-password"], timeout=90
    ).stdout.split()
    assert wrong[:2] == ["200", "401"], wrong


LOGIN_PROBE = """
import http.client, re, sys, urllib.parse
host, password = sys.argv[1:]
conn = http.client.HTTPConnection(host, 80, timeout=60)
conn.request("GET", "/login")
page = conn.getresponse()
body = page.read().decode()
cookie = (page.getheader("Set-Cookie") or "").split(";")[0]
token = re.search(r'name="csrf_token" value="([^"]+)"', body)
form = urllib.parse.urlencode({"password": password, "csrf_token": token[1] if token else ""})
conn.request("POST", "/login", body=form,
             headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
answer = conn.getresponse()
answer.read()
print(page.status, answer.status)
"""


def test_image_client_outside_the_vm_uses_it_as_exit_node(vm: Vm) -> None:
    """A laptop (wireguard-go + the meshpi agent, in a host namespace) joins the VM's
    mesh with an auth key from the VM's control and sends its traffic out through the
    VM: the server sees the VM's address."""
    started = time.monotonic()
    net = vm.net
    status = json.loads(vm.out("meshpi status --json"))  # the agent's LocalAPI
    assert status["firstboot"]["ok"] is True, status.get("firstboot")
    login = status["local_control"]["login_url"]
    assert login.startswith(f"http://{VM_V4}:8080/#"), status["local_control"]
    auth_key = vm.out("meshpi-control keys create --expires 600").splitlines()[-1]
    nodes = vm.out("meshpi-control nodes list")
    vm_id = next(line.split()[0] for line in nodes.splitlines()[1:] if line.split()[1] == HOSTNAME)
    # The exit routes only: the VM's LAN (10.99.0.0/24, advertised) holds its endpoint,
    # and a route to it through the tunnel would carry WireGuard's own packets too.
    vm.out(f"meshpi-control routes approve {vm_id} 0.0.0.0/0 ::/0")

    state = net.scratch / "laptop"
    state.mkdir(mode=0o700)
    meshpi = str(REPO / ".venv/bin/meshpi")
    local = ["--state-dir", str(state), "--local-api", str(state / "local.sock")]
    interface = f"mpimg{os.getpid() % 10000}"
    net.client.popen([meshpi, "agent", *local], log=net.scratch / "laptop-agent.log")
    wait_for(lambda: (state / "local.sock").exists(), 30, "the laptop's agent")
    server = net.internet()
    served = len(server.peers())  # another test may have asked it before
    assert net.client.fetch(SERVER_V4) == CLIENT_V4  # direct, before any exit node

    up = net.client.run([meshpi, "up", "--login-server", login, "--auth-key", auth_key, "--hostname", "laptop",
                         "--backend", "userspace", "--interface", interface, *local], check=False, timeout=90)  # fmt: skip
    assert up.stdout.startswith("connected"), up.stdout + up.stderr
    net.client.run([meshpi, "set", "--exit-node", HOSTNAME, *local], timeout=60)

    def via_vm() -> bool:
        try:
            return net.client.fetch(SERVER_V4, timeout=3) == VM_V4
        except LabError:
            return False

    wait_for(via_vm, 90, "the laptop's traffic to leave through the VM", interval=1)
    assert server.peers()[-1] == VM_V4 and server.peers()[served] == CLIENT_V4, server.peers()
    handshakes = vm.out("wg show meshpi0 latest-handshakes")
    assert any(int(fields[1]) > 0 for fields in map(str.split, handshakes.splitlines())), handshakes
    TIMINGS["exit_e2e_s"] = round(time.monotonic() - started, 1)
    net.client.run([meshpi, "down", "--state-dir", str(state)], check=False, timeout=60)


def test_image_timings(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: prints what this run took (and writes out/image-test-timings.json)."""
    (REPO / "out" / "image-test-timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    with capsys.disabled():
        print(f"\nimage tier timings: {json.dumps(TIMINGS)}")

import subprocess

from tests.lab import netns as ns


def test_netns_fixture_isolates_and_cleans_up(inside: str) -> None:
    # Inside: only lo exists.
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert [line.split(":")[1].strip() for line in out.stdout.splitlines()] == ["lo"]


def test_netns_delete_kills_processes(netns: str) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    ns.delete(netns)
    assert proc.wait(timeout=5) != 0
    assert netns not in ns.leftovers(netns)

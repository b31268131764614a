"""The lab's own resolvers: real dnsmasq (Debian's dnsmasq-base), each logging
every query it gets, so a test can count who asked what.

    café   lrouter 10.77.0.1    the laptop's LAN resolver (what its DHCP would hand out)
    home   home 192.168.77.1    the home router's resolver: the exit node's upstream, and
                                the home LAN's split DNS (nas.home.arpa, fritz.box)

Both answer every name under `leak.test` (and nothing else: no upstream, no
internet), each with its own address, so a lookup's answer says who gave it;
AAAA there is NODATA (`--local`: without it dnsmasq, having no upstream, answers
REFUSED, and glibc retries every server).

    with lab_resolvers(lab) as (cafe, home):
        lab.laptop.run(["getent", "hosts", "n1.leak.test"])
        assert cafe.queries("leak.test") == 0
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.host import Host, LabError, wait_for
from tests.lab.topology import Lab

LEAK_DOMAIN = "leak.test"
CAFE_RESOLVER, CAFE_ANSWER = "10.77.0.1", "10.66.0.1"
HOME_RESOLVER, HOME_ANSWER = "192.168.77.1", "192.168.77.53"
# The home LAN's own names: what split DNS resolves through the mesh.
HOME_LAN_DOMAINS = ("home.arpa", "fritz.box")
HOME_LAN_NAMES = {"nas.home.arpa": "192.168.77.3", "fritz.box": "192.168.77.1"}

# dnsmasq's --log-queries line: "... dnsmasq[42]: query[A] n1.leak.test from 10.77.0.2"
_QUERY = re.compile(r"dnsmasq\[\d+\]: query\[(\w+)\] (\S+) from (\S+)")


@dataclass(frozen=True)
class Query:
    qtype: str
    name: str
    client: str


@dataclass
class Dnsmasq:
    host: Host
    address: str
    answer: str  # for every name under LEAK_DOMAIN
    records: dict[str, str] = field(default_factory=dict)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.host.lab.scratch / f"dnsmasq-{self.host.role}.log"

    def start(self) -> Dnsmasq:
        if shutil.which("dnsmasq") is None:
            raise LabError("dnsmasq is not installed (./scripts/setup installs dnsmasq-base)")
        cmd = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={self.address}", "--user=root",
            "--pid-file=", "--log-queries", f"--log-facility={self.log}", "--cache-size=0",
            f"--address=/{LEAK_DOMAIN}/{self.answer}", f"--local=/{LEAK_DOMAIN}/",
        ] + [f"--host-record={name},{ip}" for name, ip in self.records.items()]  # fmt: skip
        proc = self.host.popen(cmd, log=self.log.with_suffix(".out"))

        def started() -> bool:
            if proc.poll() is not None:
                out = self.log.with_suffix(".out").read_text(errors="replace")
                raise LabError(f"{self.host.role}: dnsmasq exited {proc.returncode}: {out[-500:]}")
            return self.log.exists() and "started, version" in self.log.read_text(errors="replace")

        wait_for(started, 10, f"dnsmasq in {self.host.ns}")
        return self

    def all_queries(self) -> list[Query]:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [Query(m[1], m[2].lower(), m[3]) for m in _QUERY.finditer(text)]

    def queries(self, suffix: str = "") -> int:
        """How many queries for names ending in `suffix` (every query: "") it was asked."""
        wanted = suffix.lower()
        return sum(1 for q in self.all_queries() if q.name == wanted or q.name.endswith("." + wanted)
                   or not wanted)  # fmt: skip

    def names(self, suffix: str) -> set[str]:
        return {q.name for q in self.all_queries() if q.name.endswith(suffix.lower())}


@contextlib.contextmanager
def lab_resolvers(lab: Lab) -> Iterator[tuple[Dnsmasq, Dnsmasq]]:
    """The café's and the home's resolver, running until the block ends (the lab's
    teardown would stop them anyway)."""
    cafe = Dnsmasq(lab.lrouter, CAFE_RESOLVER, CAFE_ANSWER).start()
    home = Dnsmasq(lab.home, HOME_RESOLVER, HOME_ANSWER, dict(HOME_LAN_NAMES)).start()
    yield cafe, home


@contextlib.contextmanager
def netns_resolv_conf(host: Host, nameserver: str) -> Iterator[Path]:
    """/etc/netns/<ns>/resolv.conf naming `nameserver` (what the host's DHCP
    would write): `ip netns exec` mounts it over /etc/resolv.conf for every
    process started in the namespace. Removed afterwards."""
    directory = Path("/etc/netns") / host.ns
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "resolv.conf"
    path.write_text(f"# the lab's DHCP for {host.role}\nnameserver {nameserver}\n")
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def lookup(host: Host, name: str, timeout: float = 15) -> str | None:
    """The system resolver's answer (`getent hosts`, through nsswitch and
    resolv.conf), or None when the name does not resolve."""
    res = host.run(["getent", "hosts", name], check=False, timeout=timeout)
    if res.returncode != 0:
        return None
    return res.stdout.split()[0]

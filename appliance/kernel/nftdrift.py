"""Is table `inet meshpi` still what meshpi put there? Pure text work, no nft calls.

The digest in the table's comment says which ruleset was applied, not that the
table still holds it: `nft delete rule` or `nft delete chain` by hand leaves the
comment intact. Two checks close that gap:

- the *shape*: chain names with their number of rules, and set names. It is
  computed from the ruleset text when rendering and stored in the table's comment
  next to the digest, and computed again from `nft list table` when reading, with
  the same parser. It needs no memory, so it also catches what was deleted while
  the agent was not running.
- the *listing*: `nft list table` right after meshpi's own replace, with counters
  zeroed. Any later difference (a rule changed in place, a set element removed)
  is drift too. It lives in the agent's memory; after a restart the first
  listing whose shape matches is adopted.

The shape parser expects what core/nft.py renders and nft lists: one rule a line.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_BLOCK = re.compile(r"(?P<kind>set|map|chain|flowtable) (?P<name>\S+) \{")
# Lines inside a chain that declare the chain, not a rule.
_CHAIN_SPEC = ("type ", "comment ", "policy ", "devices ")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


@dataclass(frozen=True)
class Shape:
    chains: tuple[tuple[str, int], ...]  # (name, number of rules), sorted by name
    sets: tuple[str, ...]  # names of sets, maps and flowtables, sorted

    @property
    def fingerprint(self) -> str:
        text = ";".join(f"{n}={c}" for n, c in self.chains) + "|" + ",".join(self.sets)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def difference(self, applied: Shape) -> str:
        """What changed since `applied`, for a person: 'chain from_mesh: 6 rules, 7 applied'."""
        now, then = dict(self.chains), dict(applied.chains)
        parts = [f"chain {n} is gone" for n in sorted(then.keys() - now.keys())]
        parts += [f"chain {n} was added" for n in sorted(now.keys() - then.keys())]
        parts += [
            f"chain {n}: {now[n]} rules, {then[n]} applied"
            for n in sorted(now.keys() & then.keys())
            if now[n] != then[n]
        ]
        parts += [f"set {n} is gone" for n in sorted(set(applied.sets) - set(self.sets))]
        parts += [f"set {n} was added" for n in sorted(set(self.sets) - set(applied.sets))]
        return "; ".join(parts) or "rules or set elements differ"


def shape(text: str) -> Shape:
    """The shape of a ruleset body, or of the `nft list table` of one."""
    chains: dict[str, int] = {}
    sets: list[str] = []
    block: str | None = None  # the chain being read; "" inside a set/map/flowtable
    for line in text.splitlines():
        stripped = line.strip()
        if block is None:
            match = _BLOCK.fullmatch(stripped)
            if match:
                if match["kind"] == "chain":
                    block = match["name"]
                    chains[block] = 0
                else:
                    block = ""
                    sets.append(match["name"])
            continue
        if stripped == "}":
            block = None
        elif block and stripped and not stripped.startswith(_CHAIN_SPEC):
            chains[block] += 1
    return Shape(tuple(sorted(chains.items())), tuple(sorted(sets)))


def normalise(listing: str) -> str:
    """`nft list table` without what changes by itself (packet and byte counters)."""
    return _COUNTER.sub("counter", listing)

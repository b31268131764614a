"""Table `inet meshpi`, through the `nft` binary.

The table is always replaced whole, in one `nft -f` transaction: either the new
table is in place, or (on any error) the old one is untouched. The ruleset's
digest is kept in the table's comment, with the ruleset's shape (nftdrift.py),
so checking whether the live table is the wanted one, and still whole, costs
one `nft list`.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess

from appliance.core.model import NftRuleset
from appliance.kernel.base import KernelError, PermissionDenied
from appliance.kernel.nftdrift import Shape, normalise, shape

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "meshpi"
COMMENT_PREFIX = "meshpi:"
_QUALIFIED = f"{FAMILY} {TABLE}"

# Digests go inside a quoted nft string; anything outside this set could break out.
_DIGEST = re.compile(r"[0-9A-Za-z_.-]{1,100}")
_COMMENT = re.compile(r'comment "(?P<text>[^"]*)"')

# `table ... {}` then `delete table`: the delete always has something to delete,
# so one transaction works whether or not the table exists.
_DELETE = f"table {_QUALIFIED} {{}}\ndelete table {_QUALIFIED}\n"


def render(ruleset: NftRuleset) -> str:
    """The whole `nft -f` transaction that replaces the table with `ruleset`.

    nft's error messages count lines in this text: the ruleset's own first line
    is line 5 here."""
    if not _DIGEST.fullmatch(ruleset.digest):
        raise ValueError(f"nft ruleset digest {ruleset.digest!r}: expected [0-9A-Za-z_.-]+")
    body = ruleset.text if ruleset.text.endswith("\n") or not ruleset.text else ruleset.text + "\n"
    comment = f"{COMMENT_PREFIX}{ruleset.digest}/{shape(body).fingerprint}"
    return f'{_DELETE}table {_QUALIFIED} {{\n    comment "{comment}"\n{body}}}\n'


def parse_digest(listing: str) -> str:
    """The digest in the comment of the table `nft list table` printed ("" if none)."""
    return parse_comment(listing)[0]


def parse_comment(listing: str) -> tuple[str, str]:
    """(digest, shape fingerprint) in the comment of the table `nft list table`
    printed; "" for what is not there.

    nft prints a table's own `flags` and `comment` right after its header line,
    before any chain, set or flowtable (whose comments must not be mistaken for it)."""
    lines = iter(listing.splitlines())
    for line in lines:
        if line.startswith(f"table {_QUALIFIED} "):
            break
    for line in lines:
        stripped = line.strip()
        match = _COMMENT.fullmatch(stripped)
        if match:
            text = match["text"]
            if not text.startswith(COMMENT_PREFIX):
                return "", ""
            digest, _, fingerprint = text[len(COMMENT_PREFIX) :].partition("/")
            return digest, fingerprint
        if not stripped.startswith("flags "):
            break
    return "", ""


class NftFirewall:
    """`Firewall` on the running kernel (the caller's network namespace)."""

    def __init__(self, nft: str = "nft", timeout: float = 30.0) -> None:
        self._nft = nft
        self._timeout = timeout
        # The last table this process applied (or adopted): digest, its shape,
        # and its listing without counters. Anything else now is drift.
        self._applied: tuple[str, Shape, str] | None = None

    def _run(self, what: str, args: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        try:
            proc = subprocess.run(
                [self._nft, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                # English messages: digest() recognises "No such file or directory".
                env={**os.environ, "LC_ALL": "C"},
                check=False,
            )
        except FileNotFoundError as exc:
            raise KernelError(
                f"{what}: the nft program ({self._nft}) is not installed (apt install nftables)"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise KernelError(f"{what}: nft did not finish within {self._timeout:g}s") from exc
        except OSError as exc:
            raise KernelError(f"{what}: cannot run {self._nft}: {exc.strerror}") from exc
        return proc.returncode, proc.stdout, proc.stderr

    def _apply(self, what: str, transaction: str) -> None:
        code, _, stderr = self._run(what, ["-f", "-"], stdin=transaction)
        if code != 0:
            raise _error(what, stderr)
        log.debug("%s: done", what)

    def _list(self) -> str | None:
        what = f"read table {_QUALIFIED}"
        code, stdout, stderr = self._run(what, ["list", "table", FAMILY, TABLE])
        if code != 0:
            if "No such file or directory" in stderr:
                return None
            raise _error(what, stderr)
        return stdout

    def digest(self) -> str | None:
        """The digest of the ruleset in the table, "" if the table no longer
        holds that ruleset whole (changed by hand: the caller replaces it)."""
        listing = self._list()
        if listing is None:
            return None
        digest, fingerprint = parse_comment(listing)
        if not digest:
            return ""
        now = shape(listing)
        if self._applied is not None and self._applied[0] == digest:
            _, then, applied_listing = self._applied
            if now != then:
                return _drift(now.difference(then))
            if normalise(listing) != applied_listing:
                return _drift("rules or set elements differ")
            return digest
        # Applied by an earlier agent: its shape, kept in the comment, is the check.
        if not fingerprint:
            return _drift("applied by an older meshpi, without the ruleset's shape")
        if fingerprint != now.fingerprint:
            return _drift("its chains, rules or sets differ from the ruleset's")
        self._applied = (digest, now, normalise(listing))
        return digest

    def replace(self, ruleset: NftRuleset) -> None:
        self._applied = None
        self._apply(f"replace table {_QUALIFIED} (digest {ruleset.digest})", render(ruleset))
        listing = self._list()
        if listing is None:
            return
        listed = shape(listing)
        if listed != shape(ruleset.text):
            # The comment's shape will not match what nft lists: after a restart
            # this table is replaced once. Worth knowing, not worth failing.
            log.warning("table %s as nft lists it has another shape than ruleset %s (%s)",
                        _QUALIFIED, ruleset.digest, listed.difference(shape(ruleset.text)))  # fmt: skip
        self._applied = (ruleset.digest, listed, normalise(listing))

    def delete(self) -> None:
        self._applied = None
        self._apply(f"delete table {_QUALIFIED}", _DELETE)


def _drift(why: str) -> str:
    log.warning("table %s was changed outside meshpi (%s): it will be replaced", _QUALIFIED, why)
    return ""


def _error(what: str, stderr: str) -> KernelError:
    # nft's stderr names the failing line and quotes it with a caret: keep all of it.
    detail = stderr.strip() or "nft failed without a message"
    if "Operation not permitted" in detail:
        return PermissionDenied(f"{what}: {detail}")
    return KernelError(f"{what}:\n{detail}")

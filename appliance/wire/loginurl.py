"""The login URL, `http://host:port/#<control public key>`: all a node needs to
log in, made by control and pasted by the owner (meshpi up, meshpi.toml).

Apart from seal.py (the sealed transport) because it is text people copy: it is
parsed strictly, and each refusal quotes the URL and says what is wrong with it.
The key after `#` is control's, the one the agent then pins.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from appliance.wire.seal import AnyControlPublicKey, ControlPublicKey, b64url


class LoginUrlError(ValueError):
    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"login URL {url!r}: {reason}")


def login_url(base_url: str, control_pub: AnyControlPublicKey) -> str:
    """`http://host:port/#<control public key>`: all a node needs to log in."""
    return f"{base_url.rstrip('/')}/#{b64url(bytes(control_pub))}"


def parse_login_url(url: str) -> tuple[str, ControlPublicKey]:
    """Split a login URL into the server's base URL (no trailing slash) and its key."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise LoginUrlError(url, f"is not a URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise LoginUrlError(url, "must start with http:// or https://")
    if not parts.hostname:
        raise LoginUrlError(url, "has no host")
    if port == 0:
        raise LoginUrlError(url, "port 0 is not a port a server listens on")
    if parts.username is not None or parts.password is not None:
        raise LoginUrlError(url, "must not carry a user name or password")
    if parts.query:
        raise LoginUrlError(url, "must not have a query (?...)")
    if not parts.fragment:
        raise LoginUrlError(url, "has no control key after '#' (copy the whole URL)")
    try:
        key = ControlPublicKey.from_text(parts.fragment)
    except ValueError as e:
        raise LoginUrlError(url, f"the control key after '#': {e}") from None
    if not key.canonical:
        raise LoginUrlError(url, "the control key after '#' is not a canonical X25519 key")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", key

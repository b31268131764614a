"""WireGuard (Curve25519) keys.

A private key never prints itself: its repr and str name only the public half,
so a key that slips into a log line or a traceback leaks nothing. Code that must
hand the secret to the kernel or to a file asks for it by name: `secret_base64()`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from functools import cached_property

from nacl.public import PrivateKey as _NaclPrivateKey

KEY_LEN = 32


def _decode(text: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError("is not base64") from e
    if len(raw) != KEY_LEN:
        raise ValueError(f"decodes to {len(raw)} bytes, a WireGuard key has {KEY_LEN}")
    return raw


@dataclass(frozen=True, order=True)
class PublicKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"a public key has {KEY_LEN} bytes, not {len(self.raw)}")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(_decode(text))

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        return cls(bytes.fromhex(text))

    def __str__(self) -> str:
        return base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:
        return f"PublicKey({self})"

    @property
    def short(self) -> str:
        """The first characters, as `wg show` users recognise a peer."""
        return str(self)[:8] + "…"


@dataclass(frozen=True)
class PrivateKey:
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"a private key has {KEY_LEN} bytes, not {len(self.raw)}")
        # Clamp as Curve25519 does (and as the kernel and wireguard-go store it),
        # so a key read back from the device compares equal to the one we set.
        raw = bytearray(self.raw)
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        object.__setattr__(self, "raw", bytes(raw))

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(bytes(_NaclPrivateKey.generate()))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(_decode(text))

    def public_key(self) -> PublicKey:
        return self._public

    @cached_property
    def _public(self) -> PublicKey:
        # Once per key: a Curve25519 scalar multiplication, and path selection asks
        # for it with every check it sends.
        return PublicKey(bytes(_NaclPrivateKey(self.raw).public_key))

    def secret_base64(self) -> str:
        """The secret itself, for the kernel or a 0600 file. Never for a log."""
        return base64.b64encode(self.raw).decode()

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key()})"

    __str__ = __repr__

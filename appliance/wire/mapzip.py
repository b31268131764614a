"""Compressed sealed answers (netmap capability version 4): framing and a bounded inflate.

A sealed answer's plaintext is canonical JSON, so it starts with `{`. A compressed
one starts with a byte JSON never starts with:

    0x00 | method 0x01 (raw deflate, RFC 1951) | plaintext length (4 bytes, big-endian) | deflate stream

Control sends one only to an agent that asked with `capver` >= COMPRESS_CAPVER in its
`map` (an older agent never sees one), and the Box's MAC covers the compressed bytes,
so only the pinned control can send one. Still, an answer is input: `inflate` stops at
a limit (a decompression bomb of a few KiB could otherwise become gigabytes), checks
the length it was told, and refuses truncated streams and trailing bytes.

Control builds the stream from pieces (control/mapcache.py): deflate is a sequence of
blocks, so pieces compressed apart (each ending on a byte boundary, with a sync flush)
and stored blocks made by hand (a few bytes of header) join into one valid stream. The
peer list is compressed once per mesh version and shared; what is one node's own costs
no compression at all.
"""

from __future__ import annotations

import struct
import zlib

COMPRESS_CAPVER = 4  # the first netmap capability version that reads compressed answers
MARK = b"\x00"
METHOD_DEFLATE = 1
HEADER = struct.Struct(">BBI")  # mark, method, plaintext length
# What an agent inflates at most: a full map of 10,000 nodes is ~1.6 MiB, one whose every
# node hosts devices a few times that. Beyond this, a refusal, not an allocation.
MAX_INFLATED = 32 << 20
LEVEL = 6
_STORED_MAX = 0xFFFF
# An empty stored block with BFINAL set: ends a stream of sync-flushed pieces.
FINAL = b"\x01\x00\x00\xff\xff"


class MapZipError(ValueError):
    """A compressed answer that is refused; the message says why, with the figures."""


def compressed(data: bytes) -> bool:
    return data[:1] == MARK


def deflate_piece(text: bytes, level: int = LEVEL) -> bytes:
    """`text` as deflate blocks that end on a byte boundary, not final, referring to
    nothing before them: a piece that can go anywhere in a stream."""
    z = zlib.compressobj(level, zlib.DEFLATED, -15)
    return z.compress(text) + z.flush(zlib.Z_SYNC_FLUSH)


def stored_piece(text: bytes) -> bytes:
    """`text` as stored (uncompressed) blocks: no zlib at all, five bytes per 64 KiB.
    At a byte boundary a stored block's header is one 0x00 byte (BFINAL 0, BTYPE 00,
    padding), then LEN and its complement, little-endian."""
    out = []
    for i in range(0, len(text), _STORED_MAX):
        part = text[i : i + _STORED_MAX]
        out.append(struct.pack("<BHH", 0, len(part), len(part) ^ 0xFFFF))
        out.append(part)
    return b"".join(out)


def frame(length: int, pieces: list[bytes]) -> bytes:
    """A compressed plaintext: header, the pieces, and the final block."""
    return b"".join([HEADER.pack(MARK[0], METHOD_DEFLATE, length), *pieces, FINAL])


def compress(text: bytes, level: int = LEVEL) -> bytes:
    """A whole plaintext in one piece (tests, and answers not built from pieces)."""
    return frame(len(text), [deflate_piece(text, level)])


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """The plaintext of a compressed answer; MapZipError unless it is well formed and
    inflates to exactly the length it states, at most `limit` bytes. Never allocates
    more than `limit` (+1) bytes of output, whatever the stream says."""
    if len(data) < HEADER.size:
        raise MapZipError(
            f"compressed answer of {len(data)} bytes is shorter than its {HEADER.size}-byte header"
        )
    mark, method, length = HEADER.unpack_from(data)
    if mark != MARK[0] or method != METHOD_DEFLATE:
        raise MapZipError(
            f"compressed answer uses method {method}, this agent reads only {METHOD_DEFLATE} (deflate)"
        )
    if length > limit:
        raise MapZipError(f"compressed answer states {length} bytes, over this agent's limit of {limit}")
    z = zlib.decompressobj(-15)
    try:
        out = z.decompress(data[HEADER.size :], length + 1)
    except zlib.error as e:
        raise MapZipError(f"compressed answer is not a deflate stream ({e})") from None
    if len(out) > length or z.unconsumed_tail:
        raise MapZipError(
            f"compressed answer inflates past the {length} bytes it states (refused at {len(out)})"
        )
    if not z.eof:
        raise MapZipError(f"compressed answer is truncated: {len(out)} of {length} bytes, stream not ended")
    if z.unused_data:
        raise MapZipError(f"compressed answer has {len(z.unused_data)} bytes after its stream ends")
    if len(out) != length:
        raise MapZipError(f"compressed answer inflates to {len(out)} bytes, it states {length}")
    return out

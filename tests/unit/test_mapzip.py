"""Compressed answers (wire/mapzip.py): pieces join into one stream, and a hostile
answer (a bomb, a lie about its length, truncated, trailing bytes, not deflate) is
refused clearly, by the agent's open_response too, without inflating past the limit."""

from __future__ import annotations

import struct
import zlib

import pytest

from appliance.wire import mapzip
from appliance.wire.seal import (
    BadResponse,
    ControlKey,
    MachineKey,
    b64,
    encode_json,
    open_response,
    seal_request,
)


def test_mapzip_pieces_join_into_one_stream() -> None:
    parts = [b'{"a":[', b"x" * 70_000, b",", b"y" * 10, b"]}"]
    pieces = [mapzip.deflate_piece(parts[0]), mapzip.stored_piece(parts[1]), mapzip.deflate_piece(parts[2]),
              mapzip.stored_piece(parts[3]), mapzip.stored_piece(b""), mapzip.deflate_piece(parts[4])]  # fmt: skip
    text = b"".join(parts)
    assert mapzip.inflate(mapzip.frame(len(text), pieces)) == text
    assert mapzip.inflate(mapzip.compress(text)) == text
    assert not mapzip.compressed(encode_json({"a": 1}))  # JSON never starts with the mark


def bomb(size: int) -> bytes:
    """A stream that inflates to `size` zero bytes (1,000:1 and more)."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    out = [z.compress(chunk) for _ in range(size >> 20)]
    return b"".join(out) + z.flush()


def test_mapzip_refuses_a_bomb_without_inflating_it() -> None:
    stream = bomb(64 << 20)  # 64 MiB of zeros in ~64 KiB
    assert len(stream) < 100_000
    honest = mapzip.HEADER.pack(0, 1, 64 << 20) + stream
    with pytest.raises(
        mapzip.MapZipError, match=r"states 67108864 bytes, over this agent's limit of 33554432"
    ):
        mapzip.inflate(honest)
    lying = mapzip.HEADER.pack(0, 1, 1000) + stream  # says small, is not
    with pytest.raises(
        mapzip.MapZipError, match=r"inflates past the 1000 bytes it states \(refused at 1001\)"
    ):
        mapzip.inflate(lying)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x01", "shorter than its 6-byte header"),
        (struct.pack(">BBI", 0, 2, 10) + b"x", "uses method 2"),
        (struct.pack(">BBI", 0, 1, 10) + b"\xff\xff\xff", "is not a deflate stream"),
        (mapzip.compress(b"hello world")[:-3], "is truncated"),
        (mapzip.compress(b"hello") + b"junk", "4 bytes after its stream ends"),
        (
            mapzip.HEADER.pack(0, 1, 50) + mapzip.compress(b"hello")[mapzip.HEADER.size :],
            "inflates to 5 bytes, it states 50",
        ),
    ],
)
def test_mapzip_refuses_malformed_answers(data: bytes, message: str) -> None:
    with pytest.raises(mapzip.MapZipError, match=message):
        mapzip.inflate(data)


def sealed_answer(machine: MachineKey, control: ControlKey, plaintext: bytes, nonce: bytes) -> bytes:
    from nacl.public import Box

    return bytes(Box(control.nacl(), machine.public_key().nacl()).encrypt(plaintext))


def test_mapzip_open_response_inflates_and_bounds() -> None:
    machine, control = MachineKey.generate(), ControlKey.generate()
    _body, nonce = seal_request(machine, control.public_key(), {"op": "map"}, 1)
    text = encode_json({"re": b64(nonce), "body": {"version": 3, "full": {"peers": ["p"] * 1000}}})
    answer = sealed_answer(machine, control, mapzip.compress(text), nonce)
    assert open_response(machine, control.public_key(), answer, nonce)["version"] == 3
    with pytest.raises(BadResponse, match="over this agent's limit of 100"):
        open_response(machine, control.public_key(), answer, nonce, max_inflated=100)
    hostile = sealed_answer(machine, control, mapzip.HEADER.pack(0, 1, 1000) + bomb(8 << 20), nonce)
    with pytest.raises(BadResponse, match="inflates past the 1000 bytes"):
        open_response(machine, control.public_key(), hostile, nonce)

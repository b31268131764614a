"""A hostile sender for the STUN tests: `python -m tests.netns.stunflood SRC:PORT DST:PORT COUNT`.

Sends COUNT datagrams from SRC:PORT (through a raw socket, so the port may be one a
STUN server holds: the forged answers then come from the very server the prober
asked) to DST:PORT, cycling through:
- forged Binding success answers with random transaction ids, naming 6.6.6.6:666;
- the magic cookie at offset 4 followed by garbage (passes the prober's filter);
- random bytes shaped like WireGuard messages (type 1..4), which go to WireGuard;
- 1400 random bytes.
Prints `sent N` at the end.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from ipaddress import ip_address

from appliance.base.net import Endpoint
from appliance.kernel.stun import udp_datagram
from appliance.wire import stun

FORGED = Endpoint(ip_address("6.6.6.6"), 666)


def payloads(i: int) -> bytes:
    match i % 4:
        case 0:
            return stun.binding_response(os.urandom(12), FORGED, "evil")
        case 1:
            return os.urandom(4) + struct.pack("!I", stun.MAGIC_COOKIE) + os.urandom(i % 200)
        case 2:
            return bytes([1 + i % 4, 0, 0, 0]) + os.urandom(28 + i % 150)
        case _:
            return os.urandom(1400)


def main(argv: list[str]) -> int:
    src_text, dst_text, count = argv[0], argv[1], int(argv[2])
    src = Endpoint(ip_address(src_text.rpartition(":")[0]), int(src_text.rpartition(":")[2]))
    dst = Endpoint(ip_address(dst_text.rpartition(":")[0]), int(dst_text.rpartition(":")[2]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    sock.bind((str(src.host), 0))
    sent = 0
    for i in range(count):
        try:
            sock.sendto(udp_datagram(src, dst, payloads(i)), (str(dst.host), 0))
            sent += 1
        except OSError:  # a full queue: drop, as a real flooder would
            pass
    print(f"sent {sent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Enroll N fake nodes into a real meshpi-control, so that the nodes already in the
mesh (the image's own agent) carry N more WireGuard peers: the image tier's footprint
test measures RSS with 100 peers this way.

    python -m tests.image.enroll LOGIN_URL AUTH_KEY N

Each fake node says hello, registers with the (reusable) auth key and posts one
endpoint, as an agent does; none of them keeps a long-poll open. The keys come from a
seeded hash, so a rerun re-registers the same nodes. The last line is JSON:
{"enrolled": N, "enroll_s": ...}.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.request
from typing import Any

from appliance.base.keys import PrivateKey
from appliance.wire.loginurl import parse_login_url
from appliance.wire.seal import ControlPublicKey, MachineKey, open_response, seal_request


def _key(label: str) -> bytes:
    return hashlib.sha256(f"meshpi-image-enroll/{label}".encode()).digest()


class FakeNode:
    def __init__(self, base: str, control: ControlPublicKey, index: int) -> None:
        self.base, self.control, self.index = base, control, index
        self.machine = MachineKey(_key(f"machine{index}"))
        self.node_pub = str(PrivateKey(_key(f"node{index}")).public_key())
        self.session: str | None = None
        self.number = 0

    def _post(self, op: str, plaintext: dict[str, Any]) -> dict[str, Any]:
        data, nonce = seal_request(self.machine, self.control, plaintext, self.number)
        request = urllib.request.Request(f"{self.base}/v1/{op}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            return open_response(self.machine, self.control, answer.read(), nonce)

    def call(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.session is None:
            self.session = self._post("hello", {"op": "hello"})["session"]
            self.number = 0
        self.number += 1
        return self._post(op, {"op": op, "session": self.session, "body": body})

    def enroll(self, auth_key: str) -> None:
        answer = self.call(
            "register", {"node_key": self.node_pub, "hostname": f"fake{self.index}", "auth_key": auth_key}
        )
        if answer.get("state") != "approved":
            raise RuntimeError(f"fake node {self.index} is {answer.get('state')!r}, not approved")
        # An endpoint in TEST-NET-1 (routed nowhere in the test network): a peer the
        # kernel configures, that nothing answers.
        endpoint = f"192.0.2.{1 + self.index % 250}:{41000 + self.index}"
        self.call("update", {"endpoints": [endpoint]})


def main() -> int:
    login, auth_key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    base, control = parse_login_url(login)
    started = time.monotonic()
    for index in range(count):
        FakeNode(base, control, index).enroll(auth_key)
    print(json.dumps({"enrolled": count, "enroll_s": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The web UI's small parts that need no agent: the phone config's QR and download,
status coalescing, and the login throttle's clock."""

from __future__ import annotations

import base64
import threading
import time

import segno

from webui.agent import Coalescer
from webui.devices import conf_data_uri, conf_file_name, qr_data_uri, up_command
from webui.security import LoginThrottle

CONFIG = """[Interface]
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
Address = 100.64.0.9/32, fd7a:6d70:6900::9/128
DNS = 100.64.0.1

[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = home.example.net:51820
PersistentKeepalive = 25
"""


def test_web_phone_config_qr_is_an_inline_svg_of_the_config() -> None:
    uri, min_width = qr_data_uri(CONFIG)
    assert uri.startswith("data:image/svg+xml") and len(uri) < 12000
    # Same content, same symbol: the QR holds exactly the config (error level M, no micro QR).
    qr = segno.make(CONFIG, error="m", micro=False)
    assert qr.svg_data_uri(scale=1, border=4, dark="#000", light="#fff") == uri
    # Never drawn smaller than 4 CSS pixels a module, quiet zone included.
    assert min_width == (qr.symbol_size(scale=1, border=4)[0]) * 4


def test_web_phone_config_download_is_the_same_text() -> None:
    uri = conf_data_uri(CONFIG)
    assert uri.startswith("data:text/plain;charset=utf-8;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).decode() == CONFIG
    assert conf_file_name("phone") == "phone.conf"
    assert conf_file_name("Anna's phone / 2") == "Anna-s-phone-2.conf"
    assert conf_file_name("../..") == "meshpi.conf"
    assert conf_file_name("a" * 40) == "a" * 15 + ".conf"  # the WireGuard apps' tunnel name limit


def test_web_laptop_command_quotes_what_it_must() -> None:
    assert up_command("http://192.168.1.2:8080/#abc", "mpk-x") == (
        "sudo meshpi up --login-server 'http://192.168.1.2:8080/#abc' --auth-key mpk-x"
    )


def test_web_status_calls_in_flight_together_share_one_answer() -> None:
    coalescer, calls, entered = Coalescer(), [], threading.Semaphore(0)

    def fetch() -> dict[str, int]:
        calls.append(1)
        for _ in range(4):  # the four others have entered get() ...
            assert entered.acquire(timeout=5)
        time.sleep(0.1)  # ... and are past its lock, waiting on this call's answer
        return {"n": len(calls)}

    answers: list[object] = []

    def ask() -> None:
        entered.release()
        answers.append(coalescer.get(fetch))

    first = threading.Thread(target=lambda: answers.append(coalescer.get(fetch)))
    first.start()
    while not calls:
        time.sleep(0.001)
    others = [threading.Thread(target=ask) for _ in range(4)]
    for t in [*others]:
        t.start()
    for t in [first, *others]:
        t.join(5)
    assert answers == [{"n": 1}] * 5 and len(calls) == 1
    # A request after the wave asks again: an answer is never older than its request.
    entered = threading.Semaphore(4)
    assert coalescer.get(fetch) == {"n": 2}


def test_web_login_throttle_window_slides() -> None:
    now = [1000.0]
    throttle = LoginThrottle(per_address=2, overall=100, window=60, clock=lambda: now[0])
    throttle.failed("a")
    now[0] += 30
    throttle.failed("a")
    assert throttle.retry_after("a") == 30 and throttle.retry_after("b") == 0
    now[0] += 30
    assert throttle.retry_after("a") == 0  # the first failure left the window
    throttle.failed("a")
    assert throttle.retry_after("a") == 30
    throttle.succeeded("a")
    assert throttle.retry_after("a") == 0

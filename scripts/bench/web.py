"""Benchmark: the dashboard's weight and speed, against a real agent.

A real node (meshpi agent + its own meshpi-control, in a network namespace, as in
tests/web) creates its mesh; `meshpi-web serve` (waitress) serves the dashboard on
a loopback port, logged in through its own login form.

- First load: headless Chromium (Debian's, via Playwright) opens the dashboard;
  every response's headers and body are summed (HTML, CSS, JS, the first status
  poll; the QR and favicon are data: URIs, no request). Budget: 150 KB.
- Latency: the dashboard page and its JSON endpoint (/api/status, what the graph
  polls), sequentially and from a few concurrent clients, timed at the client on
  loopback (so it includes the web server's own work and its LocalAPI calls).
  Budget: p95 < 50 ms.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.web.node import BIN, agent_node  # noqa: E402
from webui.passwords import PasswordFile  # noqa: E402

FIRST_LOAD_BUDGET_KB = 150.0
P95_BUDGET_MS = 50.0
PASSWORD = "benchmark password"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logged_in_opener(base: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = opener.open(f"{base}/login", timeout=10).read().decode()
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    form = urllib.parse.urlencode({"csrf_token": token, "password": PASSWORD}).encode()
    opener.open(f"{base}/login", data=form, timeout=10).read()
    return opener


def first_load(base: str) -> tuple[float, list[str]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        login = browser.new_context(base_url=base)
        page = login.new_page()
        page.goto("/login")
        page.fill("#password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/")
        # A first visit: the session cookie, and nothing in the cache.
        context = browser.new_context(base_url=base)
        context.add_cookies(login.cookies())
        page = context.new_page()
        responses: list[Any] = []
        page.on("requestfinished", lambda r: responses.append(r))
        page.goto("/", wait_until="networkidle")
        total, lines = 0, []
        for r in responses:
            sizes = r.sizes()
            size = sizes["responseBodySize"] + sizes["responseHeadersSize"]
            total += size
            lines.append(f"    {size:>7} B  {r.url.removeprefix(base)}")
        browser.close()
    return total / 1000, lines


def timed(opener: urllib.request.OpenerDirector, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        with opener.open(url, timeout=10) as r:
            r.read()
            assert r.status == 200
        out.append((time.perf_counter() - start) * 1000)
    return out


def latency(base: str, path: str, n: int, clients: int) -> dict[str, float]:
    opener = logged_in_opener(base)
    timed(opener, base + path, 10)  # warm up
    sequential = timed(opener, base + path, n)
    results: list[list[float]] = [[] for _ in range(clients)]
    openers = [logged_in_opener(base) for _ in range(clients)]

    def worker(i: int) -> None:
        results[i] = timed(openers[i], base + path, n // clients)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = [x for r in results for x in r]
    return {
        "seq_p50_ms": round(pct(sequential, 0.5), 2),
        "seq_p95_ms": round(pct(sequential, 0.95), 2),
        "conc_p50_ms": round(pct(concurrent, 0.5), 2),
        "conc_p95_ms": round(pct(concurrent, 0.95), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per path and mode (default 200)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    args = ap.parse_args()
    with agent_node() as node, tempfile.TemporaryDirectory(prefix="meshpi-bench-web-") as tmp:
        node.create_mesh()
        node.client.patch("/v1/prefs", {"advertise_exit_node": True})
        PasswordFile(Path(tmp)).set(PASSWORD)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        web = subprocess.Popen(
            [str(BIN / "meshpi-web"), "serve", "--listen", f"127.0.0.1:{port}", "--socket", str(node.socket),
             "--state-dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            kb, lines = first_load(base)
            print(f"meshpi-web benchmark: the dashboard of a node whose control is local, {args.requests} "
                  f"requests per path sequentially and over {args.clients} concurrent clients")  # fmt: skip
            print(f"first load: {kb:.1f} KB in {len(lines)} responses (budget {FIRST_LOAD_BUDGET_KB:.0f} KB, "
                  f"x{kb / FIRST_LOAD_BUDGET_KB:.3f} of it)")  # fmt: skip
            print("\n".join(lines))
            figures = {
                path: latency(base, path, args.requests, args.clients) for path in ("/", "/api/status")
            }
        finally:
            web.terminate()
            web.wait(timeout=10)
    worst = 0.0
    for path, f in figures.items():
        p95 = max(f["seq_p95_ms"], f["conc_p95_ms"])
        worst = max(worst, p95)
        print(f"{path:<12} sequential p50 {f['seq_p50_ms']:.1f} ms p95 {f['seq_p95_ms']:.1f} ms; "
              f"{args.clients} concurrent p50 {f['conc_p50_ms']:.1f} ms p95 {f['conc_p95_ms']:.1f} ms "
              f"(budget p95 < {P95_BUDGET_MS:.0f} ms, x{p95 / P95_BUDGET_MS:.3f} of it)")  # fmt: skip
    ok = kb <= FIRST_LOAD_BUDGET_KB and worst < P95_BUDGET_MS
    print(f"{'within' if ok else 'OVER'} budget: first load {kb:.1f}/{FIRST_LOAD_BUDGET_KB:.0f} KB, "
          f"worst p95 {worst:.1f}/{P95_BUDGET_MS:.0f} ms")  # fmt: skip
    print(json.dumps({"first_load_kb": round(kb, 1), "p95_ms": round(worst, 2), "paths": figures}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

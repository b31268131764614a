"""The dashboard as its owner sees it on a phone (390x844) and a laptop (1280x800), in
Chromium, on a Pi that creates its own mesh (control on the Pi): first run in plain
words, a phone added by QR that shows up online with its traffic in the one list, the
headline following the facts (control gone, agent gone, a named peer using the exit),
and every page without sideways scrolling.

Screenshots of every page at both widths go to out/screenshots/ (MESHPI_SCREENSHOTS
overrides): artifacts to look at, never compared pixel by pixel.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import Home, Tab, lab_home, qr_text
from tests.lab.host import REPO_ROOT, wait_for
from tests.lab.phone import stock_client
from tests.lab.topology import HOME_WAN_V4, SERVER_V4

PASSWORD = "a long home password"
PHONE = "Anna's phone"
PHONE_ENDPOINT = f"{HOME_WAN_V4}:51820"  # the home router forwards udp 51820 to the pi
SIZES = {"phone": (390, 844), "laptop": (1280, 800)}
NARROW = (360, 414)  # the other phone widths that must not scroll sideways
SHOTS = Path(os.environ.get("MESHPI_SCREENSHOTS", REPO_ROOT / "out" / "screenshots"))


@pytest.fixture(scope="module")
def home() -> Iterator[Home]:
    with lab_home(local_control=True) as h:
        yield h


def _fits(page: Any) -> tuple[int, int]:
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")  # type: ignore[no-any-return]


def shoot(page: Any, name: str) -> None:
    """The page at every phone width and the laptop's: no sideways scrolling; a
    screenshot at 390 and 1280."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width in NARROW:
        page.set_viewport_size({"width": width, "height": 800})
        scroll, inner = _fits(page)
        assert scroll <= inner, f"{name} at {width} px scrolls sideways: {scroll} > {inner}"
    for label, (width, height) in SIZES.items():
        page.set_viewport_size({"width": width, "height": height})
        scroll, inner = _fits(page)
        assert scroll <= inner, f"{name} at {width} px scrolls sideways: {scroll} > {inner}"
        page.screenshot(path=str(SHOTS / f"{name}-{label}.png"), full_page=True)


def _no_errors(tab: Tab) -> None:
    real = [e for e in tab.errors if "the server responded with a status of" not in e]
    tab.errors.clear()
    assert real == []


def _nft(home: Home) -> str:
    return home.lab.pi.run(["nft", "list", "table", "inet", "meshpi"], check=False).stdout


def test_phone_first_run_in_plain_words_ends_with_a_working_exit(tab: Tab, home: Home) -> None:
    page = tab.page
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/")
    assert page.url == f"{home.url}/setup"
    assert not page.locator("input[name=username]").is_visible()  # `hidden` holds against the CSS
    assert page.locator("nav").count() == 0
    shoot(page, "setup-password")
    page.fill("#setup_code", home.setup_code())
    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/setup/mesh")
    # Plain words first, no menu; the jargon waits behind "Advanced".
    assert page.locator("nav").count() == 0
    assert "Most people: create a new mesh" in page.inner_text("main")
    assert not page.is_visible("#public_url")
    shoot(page, "setup-mesh")
    # A join that fails keeps what was typed.
    page.click("#join summary")
    typed = "http://127.0.0.1:9/#not-a-key"
    page.fill("#login_server", typed)
    page.fill("#auth_key", "some-key")
    page.click("#join-mesh")
    expect(page.locator("#mesh-result")).to_contain_text("Not connected")
    assert page.input_value("#login_server") == typed and page.input_value("#auth_key") == "some-key"
    page.click("#create-mesh")
    page.wait_for_url("**/setup/share", timeout=60000)
    shoot(page, "setup-share")
    page.check("#offer-exit")
    page.click("#share-save")
    page.wait_for_url(f"{home.url}/")
    wait_for(lambda: "masquerade" in _nft(home), 10, "the exit node's nft table")
    # The owner's own Pi is not "waiting for approval", and nothing else waits.
    page.reload()
    assert page.locator("#approvals").count() == 0, page.inner_text("#approvals")
    # The lab's home router forwards the port by hand (no UPnP): the headline says the
    # Pi is not reachable and how to fix it; the owner gives the forwarded address.
    headline = page.locator("#headline")
    expect(headline).to_have_attribute("data-level", "warn", timeout=10000)
    expect(headline).to_contain_text("Not reachable from outside")
    expect(headline.locator(".headline-fix")).to_contain_text("forward UDP 51820")
    shoot(page, "dashboard-first-run")
    page.goto("/settings")
    page.fill("#advertise_endpoints", PHONE_ENDPOINT)
    page.click("#settings-save")
    expect(page.locator("text=Saved: advertise_endpoints.")).to_be_visible()
    page.goto("/")
    expect(headline).to_have_attribute("data-level", "ok", timeout=10000)
    expect(headline).to_contain_text(f"reachable from the internet at {PHONE_ENDPOINT}")
    _no_errors(tab)


def _row(page: Any, name: str) -> Any:
    return page.locator(f'#connected-rows tr[data-name="{name}"]')


def test_phone_added_by_qr_shows_online_with_its_traffic(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/devices")
    shoot(page, "devices")
    page.fill("#device-name", PHONE)
    page.check("input[name=mode][value=all]")
    assert page.input_value("#device-endpoint") == PHONE_ENDPOINT  # from Settings
    page.click("#device-add")
    config = page.locator("#config").text_content() or ""
    assert config.startswith("[Interface]")
    # The camera's view: the QR as drawn at each width decodes to the config, and it
    # fills the screen's width without passing it.
    for label, (width, height) in SIZES.items():
        page.set_viewport_size({"width": width, "height": height})
        box = page.locator("#qr").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (label, box)
        assert box["width"] >= int(page.get_attribute("#qr", "data-min") or 0), (label, box)
        assert qr_text(page.locator("#qr").screenshot()) == config, label
    shoot(page, "device-new")
    page.click("text=Done")

    home.lab.internet.whoami_server()
    phone = home.lab.laptop
    with stock_client(phone, config, f"mpq{os.getpid() % 100000}", gateway="10.77.0.1"):
        wait_for(lambda: phone.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 10, "the phone out through home")
        for _ in range(5):
            phone.fetch(SERVER_V4)
        page.goto("/")
        row = _row(page, PHONE)
        expect(row).to_have_attribute("data-state", "online", timeout=10000)
        expect(row).to_have_attribute("data-rx", re.compile(r"^[1-9]"))
        # The headline names who uses the exit node.
        expect(page.locator("#headline .headline-text")).to_contain_text(PHONE, timeout=10000)
        assert page.get_attribute("#headline", "data-level") == "ok"
        # Totals are the sum of the rows, on the page as the agent said it.
        rows = page.locator("#connected-rows tr[data-id]")
        sums = page.evaluate("""() => {
            const rows = [...document.querySelectorAll('#connected-rows tr[data-id]')];
            const t = document.getElementById('totals');
            return [rows.reduce((a, r) => a + Number(r.dataset.rx), 0), Number(t.dataset.rx),
                    rows.reduce((a, r) => a + Number(r.dataset.tx), 0), Number(t.dataset.tx)];
        }""")
        assert rows.count() >= 1 and sums[0] == sums[1] and sums[2] == sums[3], sums
        assert "uses this exit node" in row.inner_text()
        shoot(page, "dashboard")
    _no_errors(tab)


def test_phone_rename_and_disable_from_the_list(tab: Tab, home: Home) -> None:
    page = tab.page
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto("/")
    row = _row(page, PHONE)
    row.locator("summary", has_text="Manage").click()
    # Within reach on the phone: on the screen, big enough for a thumb.
    for action in ("Rename", "Disable", "Revoke"):
        box = row.locator("button", has_text=action).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["height"] >= 36, (action, box)
    row.locator("input[name=name]").fill("Anna's tablet")
    row.locator("button", has_text="Rename").click()
    expect(page.locator("text=Renamed to Anna's tablet.")).to_be_visible()
    row = _row(page, "Anna's tablet")
    expect(row).to_have_count(1)
    row.locator("summary", has_text="Manage").click()
    row.locator("button", has_text="Disable").click()
    expect(_row(page, "Anna's tablet")).to_have_class(re.compile("disabled"))
    (device,) = home.agent.get("/v1/devices")["devices"]
    assert device["name"] == "Anna's tablet" and device.get("enabled") is False
    _no_errors(tab)


def test_phone_laptop_join_command_copies(tab: Tab, home: Home) -> None:
    page = tab.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto("/devices")
    page.click("#laptop-key")
    command = page.inner_text("#up-command")
    assert command.startswith("sudo meshpi up --login-server ")
    page.click("#copy-command")
    expect(page.locator("#copy-command")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == command
    shoot(page, "laptop")
    # The dashboard on http://meshpi.local is not a secure context, which has no
    # navigator.clipboard for pages: the copy falls back to the copy command.
    page.evaluate("navigator.clipboard.writeText('')")
    plain = page.context.new_page()
    plain.add_init_script("Object.defineProperty(window, 'isSecureContext', {value: false})")
    plain.goto("/devices")
    plain.click("#laptop-key")
    again = plain.inner_text("#up-command")
    plain.click("#copy-command")
    expect(plain.locator("#copy-command")).to_have_text("Copied")
    assert again != command and plain.evaluate("navigator.clipboard.readText()") == again
    plain.close()
    _no_errors(tab)


def test_phone_logs_newest_first_with_a_filter_and_settings(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/logs")
    times = page.locator("#log > div time").all_inner_texts()
    assert len(times) > 2 and times == sorted(times, reverse=True)
    page.fill("#log-filter", "tablet")
    visible = [t for t in page.locator("#log > div:visible").all_inner_texts()]
    assert visible and all("tablet" in t.lower() for t in visible)
    page.fill("#log-filter", "")
    shoot(page, "logs")
    page.goto("/settings")
    assert not page.is_visible("#mtu")  # jargon behind "Advanced"
    page.click("#advanced summary")
    assert page.is_visible("#mtu")
    shoot(page, "settings")
    page.goto("/reach")  # netcheck for a person: the verdict and the facts, in words
    assert page.inner_text("#reach-verdict").split(":")[0] in ("Yes", "Not directly")
    assert page.inner_text("#reach-udp") in ("works", "no answer from a STUN server")
    shoot(page, "reach")
    assert re.fullmatch(r"meshpi \S+", page.inner_text("#version"))
    _no_errors(tab)


def _headline(page: Any) -> tuple[str, str]:
    return page.get_attribute("#headline", "data-level") or "", page.inner_text("#headline .headline-text")


def test_phone_headline_follows_the_facts(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/")
    expect(page.locator("#headline")).to_have_attribute("data-level", "ok")
    # Control gone: the agent can't reach it, and the headline says so.
    home.stop("control")
    try:
        expect(page.locator("#headline")).not_to_have_attribute("data-level", "ok", timeout=30000)
        level, text = _headline(page)
        assert level in ("warn", "error") and "control" in text.lower(), (level, text)
        shoot(page, "dashboard-control-down")
    finally:
        home.start("control")
    expect(page.locator("#headline")).to_have_attribute("data-level", "ok", timeout=30000)
    # The agent gone: the web UI's own headline, live on the open page and on a reload.
    home.stop("agent")
    try:
        expect(page.locator("#headline .headline-text")).to_contain_text("The meshpi agent is not running")
        assert page.get_attribute("#headline", "data-level") == "error"
        page.reload()
        expect(page.locator("#headline .headline-text")).to_contain_text("The meshpi agent is not running")
        shoot(page, "agent-down")
    finally:
        home.start("agent")
    page.goto("/")
    expect(page.locator("#headline")).to_have_attribute("data-level", "ok", timeout=30000)
    tab.errors.clear()  # the 503s while the agent was away


def test_phone_login_page_tells_the_boot_partition_reset(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/")
    page.click("#logout")
    page.wait_for_url("**/login")
    assert not page.locator("input[name=username]").is_visible()
    page.click("#forgot summary")
    assert "meshpi-password.txt" in page.inner_text("#forgot")
    shoot(page, "login")
    _no_errors(tab)

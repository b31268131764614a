"""The owner's first hour, in Chromium: set up the pi (password, join the mesh, offer
the exit node), log out and back in, turn the exit node off and on from the
dashboard (checked in the pi's kernel), add a phone, scan its QR code into a stock
WireGuard client that goes out through home, and revoke it.

The tests run in order on one browser tab, as one person would.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import expect

from tests.browser.conftest import Home, Tab, qr_text
from tests.lab.host import wait_for
from tests.lab.phone import stock_client
from tests.lab.topology import HOME_WAN_V4, SERVER_V4

PASSWORD = "a long home password"
SAVED = re.compile(r"^Saved")
PHONE_ENDPOINT = f"{HOME_WAN_V4}:51820"  # the home router forwards udp 51820 to the pi's listen port


def _no_errors(tab: Tab) -> None:
    # A 401 or 429 page is a deliberate answer; Chromium logs it as a failed load.
    real = [
        e for e in tab.errors if "Failed to load resource: the server responded with a status of 4" not in e
    ]
    tab.errors.clear()
    assert real == []


def _nft(home: Home) -> str:
    return home.lab.pi.run(["nft", "list", "table", "inet", "meshpi"], check=False).stdout


def _forwarding(home: Home) -> str:
    return home.lab.pi.sysctl("net.ipv4.ip_forward")


def test_browser_first_run_setup_joins_the_mesh_and_offers_the_exit(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/")
    assert page.url == f"{home.url}/setup"
    page.fill("#setup_code", "WRONG-CODE-0000")
    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    page.click("button[type=submit]")
    assert "not this Pi's setup code" in page.inner_text("#setup-error")
    page.fill("#setup_code", home.setup_code().lower())  # as typed off the screen
    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/setup/mesh")
    page.click("#join summary")  # most people create a mesh; joining one is the second choice
    page.fill("#login_server", home.login)
    page.fill("#auth_key", home.auth_key())
    page.click("#join-mesh")
    page.wait_for_url("**/setup/share", timeout=30000)
    # The pi's LAN, as the agent detected it, is offered; this test shares only the exit.
    assert page.is_visible("text=192.168.77.0/24")
    for box in page.locator("input[name=route]").all():
        box.uncheck()
    page.check("#offer-exit")
    page.click("#share-save")
    page.wait_for_url(f"{home.url}/")
    expect(page.locator("#headline")).not_to_have_attribute("data-level", "error")
    assert page.inner_text("#node-name") == "pi"
    assert page.is_checked("#toggle-exit_node") and not page.is_checked("#toggle-lan")
    wait_for(lambda: "masquerade" in _nft(home), 10, "the exit node's nft table")
    _no_errors(tab)


def test_browser_logout_wrong_password_login(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/")
    page.click("#logout")
    page.wait_for_url("**/login")
    page.goto("/settings")
    assert page.url.endswith("/login?next=/settings")
    page.fill("#password", "not the password")
    page.click("button[type=submit]")
    assert page.inner_text("#login-error") == "Wrong password."
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/settings")
    assert page.is_visible("#settings-save")
    _no_errors(tab)


def test_browser_exit_toggle_changes_the_pis_kernel_live(tab: Tab, home: Home) -> None:
    page = tab.page
    page.goto("/")
    wait_for(lambda: "masquerade" in _nft(home) and _forwarding(home) == "1", 10, "exit node on")
    page.uncheck("#toggle-exit_node")
    expect(page.locator("#toggle-msg")).to_have_text(SAVED)
    # The table stays for the input policy (the resolver's port 53); the exit node's part goes.
    wait_for(
        lambda: "masquerade" not in _nft(home) and _forwarding(home) == "0",
        10,
        "exit off, forwarding restored",
    )
    assert home.status()["prefs"]["advertise_exit_node"] is False
    page.check("#toggle-exit_node")
    expect(page.locator("#toggle-msg")).to_have_text(SAVED)
    wait_for(lambda: "masquerade" in _nft(home) and _forwarding(home) == "1", 10, "exit node on again")
    # The page keeps the truth after a reload; the live region polls the agent every 2 s,
    # and the graph shows the agent's history (it survives the reload).
    page.reload()
    assert page.is_checked("#toggle-exit_node")
    expect(page.locator("#live")).to_have_attribute("data-polls", re.compile(r"^[2-9]"), timeout=10000)
    expect(page.locator("#graph")).to_have_attribute("data-points", "60")
    _no_errors(tab)


def test_browser_add_a_phone_whose_qr_goes_out_through_home(tab: Tab, home: Home, tmp_path: Path) -> None:
    page = tab.page
    page.goto("/devices")
    page.fill("#device-name", "phone")
    page.check("input[name=mode][value=all]")
    page.fill("#device-endpoint", PHONE_ENDPOINT)
    page.click("#device-add")
    qr = page.locator("#qr")
    expect(qr).to_be_visible()
    config = page.locator("#config").text_content() or ""  # inside a closed <details>
    assert config.startswith("[Interface]") and f"\nEndpoint = {PHONE_ENDPOINT}\n" in config
    # What the phone's camera gets: the QR as the page draws it, and the PNG it carries.
    scanned = qr_text(qr.screenshot())
    assert scanned == config
    assert (qr.get_attribute("src") or "").startswith("data:image/svg+xml")  # nothing fetched
    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "phone.conf" and saved.read_text() == config
    page.click("text=Done")
    expect(page.locator('#connected-rows tr[data-name="phone"]')).to_have_count(1)
    assert "PrivateKey" not in page.content()
    _no_errors(tab)

    # The scanned config in a stock client on the laptop's side of the internet (behind
    # its router's NAT): out through the pi, then the home router's NAT.
    lab = home.lab
    lab.internet.whoami_server()
    phone = lab.laptop
    with stock_client(phone, scanned, f"mpp{os.getpid() % 100000}", gateway="10.77.0.1"):
        wait_for(lambda: phone.fetch_or_none(SERVER_V4) == HOME_WAN_V4, 10, "the phone out through home")


def _pi_peers(home: Home) -> str:
    return home.lab.pi.run(["wg", "show", home.status()["interface"], "peers"]).stdout


def test_browser_revoke_the_phone(tab: Tab, home: Home) -> None:
    (device,) = home.agent.get("/v1/devices")["devices"]
    assert device["public_key"] in _pi_peers(home)
    page = tab.page
    page.goto("/devices")
    page.once("dialog", lambda dialog: dialog.accept())  # "Revoke phone? Its config stops working."
    row = page.locator('#connected-rows tr[data-name="phone"]')
    row.locator("summary", has_text="Manage").click()
    row.locator("button", has_text="Revoke").click()
    expect(page.locator("text=Device revoked: its key no longer works.")).to_be_visible()
    expect(page.locator('#connected-rows tr[data-name="phone"]')).to_have_count(0)
    assert home.agent.get("/v1/devices") == {"devices": []}
    wait_for(lambda: device["public_key"] not in _pi_peers(home), 5, "the pi to drop the phone's peer")
    _no_errors(tab)


def test_browser_update_page_uploads_a_bundle_and_says_why_it_is_refused(
    tab: Tab, home: Home, tmp_path: Path
) -> None:
    """The Update page in Chromium: the version running, a real multipart upload with
    the form's CSRF token; this host trusts no update key, so the bundle is refused
    with the reason, and nothing is left for root's unit."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.update.bundle import Version, write_bundle

    wheel = tmp_path / "meshpi-9.0.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel" * 100)
    bundle = tmp_path / "meshpi-9.0.0.bundle"
    key = Ed25519PrivateKey.generate()
    write_bundle(bundle, [wheel], Version(9, 0, 0), "cp313", "aarch64", "2026-12-03T00:00:00Z", key)
    page = tab.page
    page.goto("/")
    page.click("#nav-update")
    page.wait_for_url("**/update")
    assert page.inner_text("#update-current").startswith("meshpi ")
    page.set_input_files("#update-bundle", str(bundle))
    page.click("#update-submit")
    page.wait_for_url("**/update")
    said = page.inner_text("div.banner.error[role=status]")
    assert said.startswith("Update refused: no update key is trusted on this device"), said
    assert "Nothing was changed." in said
    spool = home.web_state / "update"
    assert not spool.exists() or list(spool.iterdir()) == []
    _no_errors(tab)

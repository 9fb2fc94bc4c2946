"""The demo page in a real browser: headless Chromium from the system's packages
(Debian: apt-get install chromium), driven by Playwright without its browser
download. Also the demo's HTTP routes (dev mode), which need no browser.

The browser test runs real processes: nats-server, a broker, two gateways with
the demo on. Two pages chat as two users on two gateways; the gateway of one is
killed; that page must come back through the other gateway with every message
sent meanwhile, each shown once.

Screenshots go to the test's tmp_path. RTGATE_UPDATE_DEMO_PNG=1 also copies one
to docs/demo.png.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import jwt
import pytest

from tests.conftest import SECRET, GatewayFactory, wait_until
from tests.procs import Procs
from tests.test_presence_processes import _active

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Locator, Page

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Waits that span a reconnect with backoff, or a presence timeout.
SLOW_MS = 30_000


def _chromium() -> str | None:
    for candidate in (
        os.environ.get("RTGATE_TEST_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
needs_browser = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="Playwright is not installed: pip install playwright "
        "(its browser download is not needed)",
    ),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium found (/usr/bin/chromium, chromium on PATH, or "
        "$RTGATE_TEST_CHROMIUM): apt-get install chromium",
    ),
]


# ---- The demo's routes, without a browser ---------------------------------------------


async def test_demo_routes_serve_the_page_and_dev_tokens(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(server={"id": "gw1", "dev_demo": True})
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.http("/")) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
        assert 'src="/demo/demo.js"' in page and 'href="/demo/demo.css"' in page
        async with http.get(gw.http("/demo/demo.js")) as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            assert 'from "/client.js"' in await resp.text()
        async with http.get(gw.http("/demo/demo.css")) as resp:
            assert resp.status == 200 and resp.content_type == "text/css"
        for path in ("/demo/nothing.js", "/demo/..%2Fdemo.py", "/demo/index.htm"):
            async with http.get(gw.http(path)) as resp:
                assert resp.status == 404, path

        async with http.get(gw.http("/dev/token"), params={"user": "alice"}) as resp:
            assert resp.status == 200
            token = (await resp.json())["token"]
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        assert claims["sub"] == "alice" and claims["exp"] > claims["iat"]
        for bad in ("", "two words", "x" * 257):
            async with http.get(gw.http("/dev/token"), params={"user": bad}) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["error"]["code"] == "bad_request", bad
        async with http.get(gw.http("/dev/token")) as resp:
            assert resp.status == 400


async def test_demo_routes_are_absent_without_dev_demo(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/demo/demo.js", "/dev/token?user=alice"):
            async with http.get(gw.http(path)) as resp:
                assert resp.status == 404, path


# ---- The demo in Chromium ------------------------------------------------------------


class Demo:
    """One user's demo page, and what the test asks of it."""

    def __init__(self, page: Page, context: BrowserContext, shots: Path) -> None:
        self.page = page
        self.context = context
        self.shots = shots
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def sign_in(self, url: str, name: str) -> None:
        from playwright.async_api import expect

        await self.page.goto(url)
        await self.page.get_by_test_id("name-input").fill(name)
        await self.page.get_by_test_id("signin-button").click()
        await expect(self.status).to_have_attribute("data-state", "connected")
        await expect(self.page.get_by_test_id("me")).to_have_text(name)

    @property
    def status(self) -> Locator:
        return self.page.get_by_test_id("status")

    async def join(self, room: str) -> None:
        from playwright.async_api import expect

        await self.page.get_by_test_id("room-input").fill(room)
        await self.page.get_by_test_id("join-button").click()
        await expect(self.page.get_by_test_id("room-title")).to_have_text(f"# {room}")

    async def type(self, text: str) -> None:
        await self.page.get_by_test_id("message-input").press_sequentially(text)

    async def send(self, text: str) -> None:
        box = self.page.get_by_test_id("message-input")
        await box.fill(text)
        await box.press("Enter")

    def messages(self, text: str) -> Locator:
        """Stored messages on screen with exactly this text (not the pending ones)."""
        return (
            self.page.get_by_test_id("message")
            .get_by_test_id("message-text")
            .filter(has_text=re.compile(f"^{re.escape(text)}$"))
        )

    def member(self, user: str) -> Locator:
        return self.page.locator(f'[data-testid="member"][data-user="{user}"]')

    async def shoot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=path)
        return path


async def _open(browser: Browser, url: str, name: str, shots: Path) -> Demo:
    context = await browser.new_context(viewport={"width": 1000, "height": 620})
    demo = Demo(await context.new_page(), context, shots)
    await demo.sign_in(url, name)
    return demo


@pytest.mark.timeout(180)
@needs_browser[0]
@needs_browser[1]
async def test_two_browsers_chat_across_gateways_and_survive_a_gateway_kill(
    procs: Procs, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    # Room for a busy CI machine; every wait still ends as soon as its condition holds.
    expect.set_options(timeout=10_000)
    _, broker_port = procs.broker("b1")
    await wait_until(lambda: _active(broker_port), timeout=20)
    gw1, port1 = procs.gateway("gw1", RTGATE_SERVER__DEV_DEMO="true")
    _, port2 = procs.gateway("gw2", RTGATE_SERVER__DEV_DEMO="true")
    ws1, ws2 = f"ws://127.0.0.1:{port1}/ws", f"ws://127.0.0.1:{port2}/ws"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    room = "browser-test"

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            a = await _open(
                browser, f"http://127.0.0.1:{port1}/?gateways={ws1},{ws2}", "alice", shots
            )
            b = await _open(
                browser, f"http://127.0.0.1:{port2}/?gateways={ws2},{ws1}", "bob", shots
            )
            await expect(a.page.get_by_test_id("gateway")).to_have_text("gw1")
            await expect(b.page.get_by_test_id("gateway")).to_have_text("gw2")
            await a.join(room)
            await b.join(room)

            # Presence: each sees the other in the room, across gateways.
            await expect(a.member("bob")).to_have_attribute("data-status", "online")
            await expect(b.member("alice")).to_have_attribute("data-status", "online")

            # Typing, then a message, both ways.
            await a.type("hello fr")
            await expect(b.page.get_by_test_id("typing")).to_have_text("alice is typing…")
            await a.send("hello from alice")
            await expect(b.messages("hello from alice")).to_have_count(1)
            await expect(b.page.get_by_test_id("typing")).to_have_text("")
            await b.send("hello from bob")
            await expect(a.messages("hello from bob")).to_have_count(1)
            await b.type("how are y")
            await expect(a.page.get_by_test_id("typing")).to_have_text("bob is typing…")
            demo_png = await a.shoot("a-chat")
            await b.shoot("b-chat")

            # Page A goes offline (new handshakes fail) and its gateway dies: it stays
            # away, deterministically, until it is let back online.
            await a.context.set_offline(True)
            gw1.send_signal(signal.SIGKILL)
            gw1.wait()
            await expect(a.status).to_have_attribute("data-state", "reconnecting", timeout=SLOW_MS)
            await a.send("queued by alice")
            await expect(a.status).to_contain_text("1 queued")
            await expect(a.page.get_by_test_id("message-pending")).to_have_count(1)
            meanwhile = [f"while alice is away #{i}" for i in range(1, 4)]
            for text in meanwhile:
                await b.send(text)
                await expect(b.messages(text)).to_have_count(1)
            await a.shoot("a-offline")
            # Alice's gateway is gone: after the missed heartbeats and the grace,
            # bob sees her leave.
            await expect(b.member("alice")).to_have_count(0, timeout=SLOW_MS)

            await a.context.set_offline(False)
            await expect(a.status).to_have_attribute("data-state", "connected", timeout=SLOW_MS)
            await expect(a.page.get_by_test_id("gateway")).to_have_text("gw2")
            for text in meanwhile:
                await expect(a.messages(text)).to_have_count(1)
            await expect(a.messages("queued by alice")).to_have_count(1)
            await expect(a.page.get_by_test_id("message-pending")).to_have_count(0)
            await expect(b.messages("queued by alice")).to_have_count(1)
            await expect(b.member("alice")).to_have_attribute(
                "data-status", "online", timeout=SLOW_MS
            )
            await a.shoot("a-back")

            # A third user, late, pages back through history three at a time.
            c = await _open(browser, f"http://127.0.0.1:{port2}/?pageSize=3", "carol", shots)
            await c.join(room)
            everything = ["hello from alice", "hello from bob", *meanwhile, "queued by alice"]
            shown = c.page.get_by_test_id("message")
            await expect(shown).to_have_count(3)
            older = c.page.get_by_test_id("load-older")
            while await older.is_enabled():
                before = await shown.count()
                await older.click()
                # The next page is on screen, or there was none and the button is off.
                await c.page.wait_for_function(
                    "n => document.querySelectorAll('[data-testid=message]').length > n"
                    " || document.querySelector('[data-testid=load-older]').disabled",
                    arg=before,
                )
            await expect(shown).to_have_count(len(everything))
            await expect(older).to_have_text("No older messages")
            await c.shoot("c-history")

            # Exactly once, everywhere, and no duplicate delivery hidden by the page.
            for demo in (a, b, c):
                for text in everything:
                    await expect(demo.messages(text)).to_have_count(1)
                await expect(demo.page.get_by_test_id("messages")).to_have_attribute(
                    "data-duplicates", "0"
                )
                assert demo.errors == [], demo.errors
        finally:
            await browser.close()

    assert sorted(p.name for p in shots.iterdir()) == [
        "a-back.png",
        "a-chat.png",
        "a-offline.png",
        "b-chat.png",
        "c-history.png",
    ]
    if os.environ.get("RTGATE_UPDATE_DEMO_PNG") == "1":
        shutil.copyfile(demo_png, ROOT / "docs" / "demo.png")

"""The inspector page in a real browser: Debian's chromium driven by Playwright (no browser
download).  It shows a request made with curl through a real relay, and a replay clicked on
the page.  KITE_UPDATE_SCREENSHOTS=1 also writes docs/inspector.png (the README's picture)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from support import free_port

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium must be installed in CI (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _curl(relay_port: int, path: str, *args: str) -> None:
    host = "app.test.kite"
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "20", "--resolve",
                    f"{host}:{relay_port}:127.0.0.1", f"http://{host}:{relay_port}{path}",
                    *args], check=True, timeout=30)


def test_inspector_page_shows_and_replays(browser, relay_process, expose_process, http_origin,
                                         tmp_path):
    relay = relay_process()
    port = free_port()
    expose = expose_process(str(http_origin.port), "app.test.kite", relay,
                            f"--inspect=127.0.0.1:{port}")
    expose.wait_for("inspector: http://")
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector("#status:has-text('0 requests')")

    _curl(relay.port, "/", "-H", "Authorization: Bearer visitor-secret")
    _curl(relay.port, "/api/items?page=2", "-H", "Cookie: session=abc")
    _curl(relay.port, "/api/items", "-H", "Content-Type: application/json",
          "--data-binary", '{"name": "kite", "color": "red"}')
    row = page.locator("tr.row", has_text="/api/items?page=2")
    row.wait_for()  # the page polls: the request appears without a reload
    row.click()
    page.wait_for_selector("#detail h2:has-text('/api/items?page=2')")
    assert "session=***" in page.inner_text("#detail")

    hits = len(http_origin.hits)
    page.click("#replay")
    replayed = page.locator("tr.row", has_text="replay of #")
    replayed.wait_for()
    page.wait_for_selector("#detail .note:has-text('replay of #')")
    assert len(http_origin.hits) == hits + 1
    assert http_origin.hits[-1][1] == "/api/items?page=2"
    assert page.locator("tr.row").count() == 4

    shot = tmp_path / "inspector.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("KITE_UPDATE_SCREENSHOTS"):
        shutil.copy(shot, DOCS / "inspector.png")

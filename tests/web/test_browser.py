"""A real browser against the real server: Debian's chromium driven by Playwright (headless).

Starts uvicorn on a free 127.0.0.1 port with the tiny model (exported on the fly), uploads a
synthetic X-ray, reads the verdict and probabilities from the page, switches the overlay on,
and saves a screenshot to $PNEUMOSCAN_ARTIFACTS (default: a temp folder; never the repo).
"""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("PNEUMOSCAN_REQUIRE_BROWSER"),
                                 reason=f"{CHROMIUM} not installed (apt-get install chromium)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import uvicorn

    from pneumoscan.web.app import create_app
    from pneumoscan.web.config import ServeConfig

    port = free_port()
    app = create_app(ServeConfig(model_dir=str(tiny_model_dir)))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert app.state.service.error is None, app.state.service.error
        time.sleep(0.2)
    else:
        pytest.fail("server did not become ready")
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def artifacts(tmp_path) -> Path:
    d = Path(os.environ.get("PNEUMOSCAN_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def xray_png(path: Path) -> Path:
    """A synthetic chest-like image: dark 'lungs' in a bright 'body' (not a dataset image)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    a = 170 + rng.normal(0, 12, (256, 256))
    for cx in (80, 176):
        a[((xx - cx) / 50) ** 2 + ((yy - 128) / 90) ** 2 < 1] -= 110
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_page_upload_verdict_overlay(server, artifacts, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from pneumoscan import INTENDED_USE
    from pneumoscan.web.service import explain_available

    image = xray_png(tmp_path / "synthetic-xray.png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            expect(page.locator("#intended-use")).to_have_text(INTENDED_USE)
            expect(page.locator("#status")).to_contain_text("ready", timeout=30_000)
            page.set_input_files("#file", str(image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)
            verdict = page.locator("#verdict").inner_text()
            assert verdict in ("Pneumonia", "No pneumonia")
            probs = {lab: float(page.locator(f'.bar[data-label="{lab}"]').get_attribute("data-p"))
                     for lab in ("normal", "bacterial", "viral")}
            shown = {lab: page.locator(f"#p-{lab}").inner_text() for lab in probs}
            assert abs(sum(probs.values()) - 1) < 1e-4 and all(s.endswith("%") for s in shown.values())
            api = httpx.post(  # the page shows what the API says
                server + "/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
            assert (verdict == "Pneumonia") == api["pneumonia"]
            assert all(abs(probs[k] - api["probabilities"][k]) < 1e-6 for k in probs)
            expect(page.locator("#preview")).to_be_visible()
            page.check("#overlay-toggle")
            if explain_available():
                expect(page.locator("#overlay")).to_be_visible(timeout=60_000)
                expect(page.locator("#overlay-status")).to_contain_text("Grad-CAM", timeout=60_000)
                for _ in range(100):  # the blob image decodes asynchronously
                    if page.locator("#overlay").evaluate("el => el.naturalWidth") > 0:
                        break
                    page.wait_for_timeout(100)
                width = page.locator("#overlay").evaluate("el => el.naturalWidth")
                assert width > 0, page.locator("#overlay-status").inner_text()
            else:
                expect(page.locator("#overlay-status")).to_contain_text("not available")
            shot = artifacts / "browser-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert not errors, errors
        finally:
            browser.close()

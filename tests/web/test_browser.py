"""A real browser against the real server: Debian's chromium driven by Playwright (headless).

Starts the server on a free 127.0.0.1 port with the tiny model, and checks the page at a desktop
(1280 px) and a phone (390 px) width: upload, verdict and probabilities as the API says, the
Grad-CAM layer with its legend, an error (no broken image), a DICOM (a server-side preview), the
client-side size check, no 404 and no third-party request from any page (also /docs and /redoc).
Screenshots go to $PNEUMOSCAN_ARTIFACTS (CI keeps them; default: a temp folder, never the repo).
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SIZES = {"desktop": {"width": 1280, "height": 800}, "mobile": {"width": 390, "height": 844}}

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("PNEUMOSCAN_REQUIRE_BROWSER"),
                                 reason=f"{CHROMIUM} not installed (apt-get install chromium)")]


@pytest.fixture(scope="module")
def server(live):
    with live(max_upload_mb=1.0) as (url, _):  # a small limit: the size-check test sends 2 MiB, not 21
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    d = Path(os.environ.get("PNEUMOSCAN_ARTIFACTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


class Watched:
    """A page that records failed responses, page errors and every request leaving 127.0.0.1 (blocked)."""

    def __init__(self, browser, server: str, size: str) -> None:
        self.page = browser.new_page(viewport=SIZES[size])
        self.bad: list[str] = []
        self.errors: list[str] = []
        self.external: list[str] = []
        self.requests: list[str] = []
        host = urlparse(server).netloc
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", lambda r: r.status >= 400 and self.bad.append(f"{r.status} {r.url}"))
        self.page.on("request", lambda r: self.requests.append(f"{r.method} {urlparse(r.url).path}"))

        def route(r):
            url = r.request.url
            if url.startswith(("data:", "blob:")) or urlparse(url).netloc == host:
                r.continue_()
            else:
                self.external.append(url)
                r.abort()

        self.page.route("**/*", route)

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def watched(browser, server):
    pages: list[Watched] = []

    def make(size: str = "desktop") -> Watched:
        pages.append(Watched(browser, server, size))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def xray_png(path: Path) -> Path:
    """A synthetic chest-like image: dark 'lungs' in a bright 'body' (not a dataset image)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    a = 170 + rng.normal(0, 12, (256, 256))
    for cx in (80, 176):
        a[((xx - cx) / 50) ** 2 + ((yy - 128) / 90) ** 2 < 1] -= 110
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path)
    return path


def _ready(page, server: str) -> None:
    from playwright.sync_api import expect

    from pneumoscan import INTENDED_USE

    page.goto(server + "/")
    expect(page.locator("#intended-use")).to_have_text(INTENDED_USE)
    expect(page.locator("#status")).to_contain_text("threshold", timeout=30_000)


def _images_render(page) -> None:
    """Every visible <img> has decoded (no broken-image icon)."""
    broken = page.evaluate("""() => [...document.images].filter(i => i.offsetParent !== null)
                                       .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.id || i.src)""")
    assert broken == [], broken


@pytest.mark.parametrize("size", list(SIZES))
def test_page_upload_verdict_overlay(watched, server, artifacts, tmp_path, size):
    from playwright.sync_api import expect

    w = watched(size)
    page = w.page
    _ready(page, server)
    assert page.locator("#viewer-col").is_hidden()  # no empty black bar before an upload
    image = xray_png(tmp_path / "synthetic-xray.png")
    page.set_input_files("#file", str(image))
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    verdict = page.locator("#verdict").inner_text()
    probs = {lab: float(page.locator(f'.bar[data-label="{lab}"]').get_attribute("data-p"))
             for lab in ("normal", "bacterial", "viral")}
    api = httpx.post(server + "/api/predict", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
    assert verdict == ("Pneumonia" if api["pneumonia"] else "No pneumonia")  # the page shows what the API says
    assert all(abs(probs[k] - api["probabilities"][k]) < 1e-6 for k in probs)
    assert page.locator("#certainty").inner_text().lower() in ("clear", "moderate", "borderline")
    expect(page.locator("#preview")).to_be_visible()
    box = page.locator("#verdict").bounding_box()
    assert box["y"] + box["height"] <= SIZES[size]["height"], "the verdict is below the fold"
    assert "on the right" not in page.content()
    page.check("#overlay-toggle")
    expect(page.locator("#overlay")).to_be_visible(timeout=60_000)
    expect(page.locator("#legend")).to_be_visible()
    expect(page.locator("#legend-text")).to_contain_text(api["label"])
    page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0", timeout=10_000)
    ov, pv = page.locator("#overlay").bounding_box(), page.locator("#preview").bounding_box()
    assert abs(ov["width"] - pv["width"]) < 2 and abs(ov["height"] - pv["height"]) < 2  # the map lies on the image
    _images_render(page)
    shot = artifacts / f"browser-{size}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert not w.errors and not w.bad and not w.external, (w.errors, w.bad, w.external)


def test_error_is_shown_without_a_broken_image(watched, server, artifacts, tmp_path):
    from playwright.sync_api import expect

    w = watched()
    page = w.page
    _ready(page, server)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 300)
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_contain_text("broken.jpg", timeout=30_000)
    expect(page.locator("#error")).to_contain_text("Error 400")
    assert page.locator("#viewer-col").is_hidden() and page.locator("#result").is_hidden()
    _images_render(page)
    page.screenshot(path=str(artifacts / "browser-error.png"), full_page=True)
    assert not w.errors and not w.external


def test_dicom_gets_a_server_side_preview(watched, server, artifacts, make_dicom):
    from playwright.sync_api import expect

    w = watched()
    page = w.page
    _ready(page, server)
    yy, xx = np.mgrid[0:200, 0:160]
    a = (2000 + 900 * np.sin(xx / 11.0) * np.cos(yy / 17.0)).clip(0, 4095)
    page.set_input_files("#file", files=[{"name": "scan.dcm", "mimeType": "application/dicom", "buffer": make_dicom(a)}])
    expect(page.locator("#result")).to_be_visible(timeout=30_000)
    expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth === 160", timeout=10_000)
    expect(page.locator("#caption")).to_contain_text("DICOM 160 × 200")
    _images_render(page)
    page.screenshot(path=str(artifacts / "browser-dicom.png"), full_page=True)
    assert not w.errors and not w.bad and not w.external


def test_too_large_file_is_refused_before_uploading(watched, server):
    from playwright.sync_api import expect

    w = watched("mobile")
    page = w.page
    _ready(page, server)
    big = b"\xff\xd8\xff" + b"\0" * (2 * 2**20)
    page.set_input_files("#file", files=[{"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": big}])
    expect(page.locator("#error")).to_contain_text("over the limit of 1 MiB")
    assert not [r for r in w.requests if r.startswith("POST")]


@pytest.mark.parametrize("path,ready", [("/docs", ".swagger-ui .opblock"), ("/redoc", "text=Classify one X-ray")])
def test_api_docs_render_offline(watched, server, artifacts, path, ready):
    w = watched()
    w.page.goto(server + path)
    w.page.wait_for_selector(ready, timeout=30_000)
    w.page.screenshot(path=str(artifacts / f"browser{path.replace('/', '-')}.png"))
    assert not w.external, w.external  # everything from the package: nothing from a CDN
    assert not w.bad and not w.errors, (w.bad, w.errors)

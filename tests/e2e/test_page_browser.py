"""The page at GET / in a real headless Chromium, against the real server process.

Needs Debian's `chromium` and Playwright for Python (pointed at that browser); skips when
either is missing. Screenshots go to test-artifacts/page/ (git-ignored).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.cards import copy_checkpoint
from tests.server_process import ROOT, serving
from tests.serving_helpers import CLASSES, encode, png

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "test-artifacts" / "page"
KEY = "browser-test-key"
XSS = "<img src=x onerror=alert(1)>"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Playwright for Python is not installed")


def _write_reports(folder: Path) -> None:
    from training.export.report import plot_confusion, plot_curves

    history = [{"epoch": e, "train_loss": 1.2 / e, "val_loss": 1.3 / e, "val_accuracy": 1 - 0.4 / e}
               for e in range(1, 6)]
    plot_curves(folder / "curves.png", history, "accuracy")
    plot_confusion(folder / "confusion_matrix.png", [[16, 0, 0], [1, 15, 0], [0, 0, 16]], CLASSES)


def _renamed(card: dict) -> str:
    card["name"], card["classes"] = "xss", ["red", "green", XSS]
    return json.dumps(card)


@pytest.fixture(scope="module")
def server(checkpoint_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m app` with an API key over colors (with report figures), tags and `xss`
    (colors with its class `blue` renamed to an HTML snippet); its base URL."""
    root = tmp_path_factory.mktemp("page-checkpoints")
    shutil.copytree(checkpoint_root / "colors", root / "colors")
    shutil.copytree(checkpoint_root / "tags", root / "tags")
    copy_checkpoint(checkpoint_root / "colors", root / "xss", card_text=_renamed)
    _write_reports(root / "colors")
    env = {"RESNET_SERVE_API_KEYS": KEY, "RESNET_SERVE_TORCH_THREADS": "1"}
    with serving(root, root / "server.log", "--default-model", "colors", "--max-batch-size",
                 "4", env=env, headers={"X-API-Key": KEY}, models=3) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium (the system's), driven by Playwright."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox"])
        yield launched
        launched.close()


def _photo() -> bytes:
    """A real photograph (scikit-image's cat) as JPEG bytes."""
    from skimage import data

    return encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)


def _top_label(url: str, model: str, name: str, content: bytes) -> str:
    r = httpx.post(f"{url}/predict", params={"model": model}, headers={"X-API-Key": KEY},
                   files={"file": (name, content, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["predictions"][0]["label"]


def _upload(page, name: str, content: bytes, mime: str = "image/jpeg"):
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime,
                                                "buffer": content}])
    item = page.locator(".result").first
    item.locator(":scope[data-state='done'], :scope[data-state='error']").wait_for()
    return item


def _choose(page, model: str) -> None:
    page.select_option("#model-select", model)


def test_the_page_classifies_explains_and_reports_errors(browser, server: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    console, dialogs = [], []
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.add_init_script("window.__csp = []; document.addEventListener("
                         "'securitypolicyviolation', e => window.__csp.push(e.violatedDirective))")

    page.goto(server + "/")
    # keys are configured: the page loads, then asks for one
    page.locator("#key-section").wait_for(state="visible")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#model-select option[value=colors]").wait_for(state="attached")
    assert page.evaluate("sessionStorage.getItem('resnet-serve.api-key')") == KEY

    page.click("#card summary")
    page.locator("#card .reports img").nth(1).wait_for()
    assert page.locator("#card .classes li").all_inner_texts() == CLASSES

    photo = _photo()
    item = _upload(page, "chelsea.jpg", photo)
    assert item.get_attribute("data-state") == "done"
    labels = item.locator(".bar .label").all_inner_texts()
    assert labels[0] == _top_label(server, "colors", "chelsea.jpg", photo)
    assert sorted(labels) == sorted(CLASSES)
    assert "ms" in item.locator(".meta").inner_text()
    assert item.locator(".preview").get_attribute("alt") == "Uploaded image chelsea.jpg"

    item.locator(".heat-toggle").click()
    item.locator(":scope[data-heatmap='shown']").wait_for()
    assert item.locator(".preview").get_attribute("src").startswith("data:image/png;base64,")
    assert item.locator(".heat-toggle").get_attribute("aria-pressed") == "true"
    page.screenshot(path=str(ARTIFACTS / "page-desktop.png"), full_page=True)

    bad = _upload(page, "broken.jpg", b"this is not a picture")
    assert bad.get_attribute("data-state") == "error"
    assert "400" in bad.locator(".error").inner_text()
    assert "broken.jpg" in bad.locator(".error").inner_text()

    _choose(page, "tags")
    tags = _upload(page, "green.png", png("green", seed=2), "image/png")
    assert tags.locator(".bar").count() == 3 and tags.locator(".bar .cut").count() == 3
    assert tags.locator(".bar.pass .label").all_inner_texts() == ["green"]

    _choose(page, "xss")
    assert XSS in page.locator("#card .classes").inner_text()
    hostile = _upload(page, "blue.png", png("blue", seed=3), "image/png")
    assert hostile.locator(".bar .label").first.inner_text() == XSS
    assert page.locator("img[src='x']").count() == 0

    # keyboard: the drop zone is a button that opens the file picker
    with page.expect_file_chooser() as chooser:
        page.locator("#drop").press("Enter")  # focuses the button, then presses the key
    assert chooser.value.is_multiple()

    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width} px wide at a 390 px viewport"

    assert dialogs == []
    assert page.evaluate("window.__csp") == []
    # the only console errors allowed: the browser's own notes on the deliberate 401 and 400
    unexpected = [(kind, text) for kind, text in console
                  if kind in ("error", "pageerror") and not (
                      text.startswith("Failed to load resource") and ("401" in text
                                                                      or "400" in text))]
    assert unexpected == [], unexpected
    assert not any("Content Security Policy" in text for _, text in console)
    print(f"screenshots in {ARTIFACTS}")


def test_the_docs_work_offline_and_ask_for_the_key(browser, server: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    console, hosts = [], set()
    page.on("console", lambda m: console.append((m.type, m.text)))
    page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
    page.on("request", lambda r: hosts.add(r.url.split("/")[2]))
    page.add_init_script("window.__csp = []; document.addEventListener("
                         "'securitypolicyviolation', e => window.__csp.push(e.violatedDirective))")

    page.goto(server + "/docs")  # a browser cannot send the key with this URL: the page is open
    page.locator("#key-section").wait_for(state="visible")
    assert page.locator(".opblock").count() == 0  # nothing of the API before the key
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.locator(".opblock-summary-path[data-path='/predict']").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=False)

    # a call tried from the docs carries the key too
    models = page.locator(".opblock-get:has(.opblock-summary-path[data-path='/models'])").first
    models.locator(".opblock-summary").click()
    models.locator("button.try-out__btn").click()
    models.locator("button.execute").click()
    answer = models.locator(".live-responses-table tbody .response")
    answer.wait_for()
    assert answer.locator(".response-col_status").inner_text().strip() == "200"
    assert "colors" in answer.locator(".microlight").first.inner_text()

    assert hosts == {server.split("/")[2]}, hosts  # nothing from another host
    assert page.evaluate("window.__csp") == []
    # the one error: /openapi.json answering 401 before the key was given
    assert [c for c in console if c[0] in ("error", "pageerror")] == [
        ("error", "Failed to load resource: the server responded with a status of 401 "
                  "(Unauthorized)")], console
    page.close()

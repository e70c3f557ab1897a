"""The app in real headless Chromium (Debian's package, driven by Playwright): one private prediction end to end.

`molcloak app` runs as a subprocess and starts its own `molcloak serve` child, as a user would run it.
Set MOLCLOAK_APP_BUNDLE to drive another bundle and MOLCLOAK_SCREENSHOTS to keep the screenshot set
(desktop 1280x900, narrow 390x844, batch tab): the README's set is made with
`MOLCLOAK_APP_BUNDLE=demo/bundle MOLCLOAK_SCREENSHOTS=docs pytest -m browser tests/test_browser.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from molcloak.app.explain import PHYSCHEM
from molcloak.app.launcher import free_port
from molcloak.pipeline.metrics import describe
from molcloak.pipeline.predict import Simulator

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]
SMILES = "CC(=O)Oc1ccccc1C(=O)O"
TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def app_url(tiny_binary, tmp_path_factory):
    bundle = Path(os.environ.get("MOLCLOAK_APP_BUNDLE") or tiny_binary[2])
    state = tmp_path_factory.mktemp("browser-app")
    port = free_port()
    with open(state / "app.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "molcloak.pipeline.cli",
                "app",
                "--bundle",
                str(bundle),
                "--port",
                str(port),
                "--state-dir",
                str(state),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, (state / "app.log").read_text()[-2000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        pytest.fail("molcloak app did not come up in 300 s")
    yield url, bundle, state
    proc.terminate()
    proc.wait(timeout=60)
    assert not list((state / "sessions").iterdir()), "session keys left behind after the app stopped"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make chromium` (apt-get install chromium) installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.close()


def _text(page, element_id: str) -> str:
    return page.inner_text(f"#{element_id}")


def _wait_text(page, element_id: str, needle: str) -> str:
    page.wait_for_function(
        "([id, needle]) => { const e = document.getElementById(id); return e && e.innerText.includes(needle); }",
        arg=[element_id, needle],
        timeout=TIMEOUT_MS,
    )
    return _text(page, element_id)


def _enabled(page, element_id: str) -> bool:
    return page.is_enabled(f"#{element_id}")


def _shots() -> Path | None:
    """Where the screenshot set goes: MOLCLOAK_SCREENSHOTS (the README's set: docs/), else nowhere."""
    d = os.environ.get("MOLCLOAK_SCREENSHOTS")
    return Path(d) if d else None


def _shot(page, name: str, tmp_path: Path, full_page: bool = True) -> None:
    """A screenshot of the page; in the README's set, reduced to a 64-colour palette (small PNGs)."""
    from PIL import Image

    path = (_shots() or tmp_path) / name
    page.screenshot(path=str(path), full_page=full_page, type="png")
    assert path.stat().st_size > 10_000
    if _shots():
        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def test_private_prediction_in_chromium(app_url, page, tmp_path):
    url, bundle, state = app_url
    page.goto(url)
    page.wait_for_selector("#smiles textarea")
    assert "on the owner's test split" in _text(page, "model-card")
    # defect 5: no "Share" button on the drawing (it only answered "Must be on Spaces to share")
    assert (
        page.locator("#mol-image button[title*='hare'], #mol-image button[aria-label*='hare']").count() == 0
    )
    # steps that cannot run yet are disabled
    assert _enabled(page, "keys-btn") and not _enabled(page, "encrypt-btn") and not _enabled(page, "run-btn")

    page.fill("#smiles textarea", SMILES)
    _wait_text(page, "mol-status", "parsed by RDKit")
    page.wait_for_selector("#mol-image img")

    # defect 2: the card says it is running and its output box is tall enough to show the progress
    page.click("#keys-btn")
    _wait_text(page, "keys-state", "running")
    assert not _enabled(page, "predict-btn")  # everything disabled while a step runs
    assert page.locator("#keys-out").bounding_box()["height"] >= 60
    keys = _wait_text(page, "keys-out", "New keys in")
    assert "MB of evaluation keys uploaded" in keys and "done in" in _wait_text(page, "keys-state", "done")
    assert len(list((state / "sessions").glob("*/keys/*/keys.bin"))) == 1  # the secret key, on the app's side
    page.wait_for_function("() => !document.querySelector('#encrypt-btn').disabled")
    page.click("#encrypt-btn")
    assert "bytes" in _wait_text(page, "encrypt-out", "all the server gets")
    page.wait_for_function("() => !document.querySelector('#run-btn').disabled")
    page.click("#run-btn")
    _wait_text(page, "run-out", "Computed on ciphertexts")
    page.wait_for_function("() => !document.querySelector('#decrypt-btn').disabled")
    page.click("#decrypt-btn")
    result = _wait_text(page, "result-out", "decrypted here")
    assert "aqueous solubility class (Huuskonen)" in result
    page.wait_for_selector("#result-label")
    assert "Ciphertext" in _text(page, "server-out") and "Feature vector" in _text(page, "here-out")

    sim = Simulator(bundle)
    _, values = sim([SMILES])
    assert describe(sim.task, values[0]).split(" (")[0] in _text(page, "decrypt-out")

    # the explain view: its cost said before it starts, then the contributions in the chemist's terms
    page.wait_for_function("() => !document.querySelector('#explain-btn').disabled")
    cost = _text(page, "explain-cost")
    assert "encrypted runs" in cost and "only ciphertexts" in cost
    assert "encrypted runs, about" in page.inner_text("#explain-btn")
    page.click("#explain-btn")
    explained = _wait_text(page, "explain-out", "decrypted here")
    assert "towards '" in explained and any(
        f"{words} ({name})" in explained for name, words in PHYSCHEM.items()
    )
    page.wait_for_function("() => !document.querySelector('#predict-btn').disabled")
    _shot(page, "app-desktop.png", tmp_path)

    # defect 3: a new molecule clears the old results; run cannot reuse the old ciphertext
    page.fill("#smiles textarea", "OCC(O)CO")
    page.wait_for_function("() => document.getElementById('result-out').innerText.trim() === ''")
    assert not _enabled(page, "run-btn") and _text(page, "encrypt-out").strip() == ""

    # defect 5: Enter in the SMILES box predicts privately; defect 4: the keys are reused, not "generated"
    page.press("#smiles textarea", "Enter")
    result = _wait_text(page, "result-out", "OCC(O)CO")
    assert _wait_text(page, "keys-out", "Using the keys this session made earlier")
    _, values = sim(["OCC(O)CO"])
    assert describe(sim.task, values[0]).split(" (")[0] in _text(page, "decrypt-out")

    # an invalid SMILES: a toast naming molcloak (Gradio 6.31 titles toasts by type), and the app keeps working
    page.fill("#smiles textarea", "C1CC(")
    _wait_text(page, "mol-status", "could not be parsed by RDKit")
    page.click("#predict-btn")
    toast = page.locator("[data-testid='toast-body']").last
    toast.wait_for()
    assert "molcloak: SMILES 'C1CC(' could not be parsed by RDKit" in toast.inner_text()
    page.wait_for_function("() => !document.querySelector('#predict-btn').disabled")


def test_narrow_layout_and_batch_tab(app_url, browser, tmp_path):
    url, bundle, state = app_url
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(url)
        page.wait_for_selector("#smiles textarea")
        cards = [page.locator(f"#{s}-btn").bounding_box() for s in ("keys", "encrypt", "run", "decrypt")]
        assert all(b["width"] > 250 for b in cards)  # stacked, not squeezed side by side
        assert page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scrolling
        here, server = (page.locator(f"#{i}").bounding_box() for i in ("here-out", "server-out"))
        assert server["y"] >= here["y"] + here["height"] - 1  # the two columns are stacked
        page.fill("#smiles textarea", "CCCCO")
        page.click("#predict-btn")
        _wait_text(page, "result-out", "CCCCO")
        page.wait_for_function(
            "() => { const r = document.getElementById('result').getBoundingClientRect();"
            " return r.top < window.innerHeight && r.bottom > 0; }"
        )  # the result was scrolled into view
        page.wait_for_function("() => !document.querySelector('#predict-btn').disabled")  # comparison done
        assert "encrypted runs" in page.inner_text("#explain-btn")  # the explain cost on the button
        assert page.evaluate("document.documentElement.scrollWidth") <= 400  # it wraps, no sideways scroll
        page.wait_for_timeout(1500)  # let the result's fade-in end before the screenshot
        _shot(page, "app-narrow.png", tmp_path, full_page=False)

        page.set_viewport_size({"width": 1280, "height": 900})
        page.click("#tab-batch-button")
        csv = tmp_path / "library.csv"
        csv.write_text(f"smiles\n{SMILES}\nC1CC(\nCCCCO\nOCC(O)CO\n")
        page.set_input_files("#batch-file input[type=file]", str(csv))
        page.click("#batch-btn")
        status = _wait_text(page, "batch-status", "could not be read")  # the final status, not the progress
        assert "3 of 4 rows predicted privately" in status and "1 could not be read" in status
        assert "Keys of this session (reused)" in status  # made by the prediction above, not new ones
        assert "could not be parsed" in _text(page, "batch-table")
        link = page.locator("#batch-download a").first
        link.wait_for()
        with page.expect_download() as info:
            link.click()
        lines = Path(info.value.path()).read_text().splitlines()
        assert lines[0] == "index,smiles,prediction,value,error" and len(lines) == 5
        _shot(page, "app-batch.png", tmp_path)
    finally:
        page.close()


def test_leaving_the_page_ends_the_session(app_url, page):
    url, bundle, state = app_url
    sessions = state / "sessions"
    page.goto(url)
    page.wait_for_selector("#smiles textarea")
    page.fill("#smiles textarea", "CCO")
    page.click("#predict-btn")
    _wait_text(page, "result-out", "CCO")
    assert list(sessions.iterdir())
    page.goto("about:blank")
    deadline = time.monotonic() + 120
    while list(sessions.iterdir()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not list(sessions.iterdir()), "the session's keys outlived the closed page"

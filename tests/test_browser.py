"""The app in real headless Chromium (Debian's package, driven by Playwright): one private prediction end to end.

`molcloak app` runs as a subprocess and starts its own `molcloak serve` child, as a user would run it.
Set MOLCLOAK_APP_BUNDLE to drive another bundle (the README screenshot uses demo/bundle) and
MOLCLOAK_SCREENSHOT to keep the screenshot somewhere else than the test's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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
def page():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make chromium` (apt-get install chromium) installs it")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def _text(page, element_id: str) -> str:
    return page.inner_text(f"#{element_id}")


def _wait_text(page, element_id: str, needle: str) -> str:
    page.wait_for_function(
        "([id, needle]) => { const e = document.getElementById(id); return e && e.innerText.includes(needle); }",
        arg=[element_id, needle],
        timeout=TIMEOUT_MS,
    )
    return _text(page, element_id)


def test_private_prediction_in_chromium(app_url, page, tmp_path):
    url, bundle, state = app_url
    page.goto(url)
    page.wait_for_selector("#smiles textarea")
    assert "on the owner's test split" in _text(page, "model-card")

    # 1. the molecule, drawn by RDKit
    page.fill("#smiles textarea", SMILES)
    _wait_text(page, "mol-status", "parsed by RDKit")
    page.wait_for_selector("#mol-image img")

    # 2.-5. keys, encrypt, run in FHE on the server, decrypt: one button each
    page.click("#keygen-btn")
    keys = _wait_text(page, "keys-out", "Keys ready")
    assert "MB uploaded" in keys
    assert len(list((state / "sessions").glob("*/keys/*/keys.bin"))) == 1  # the secret key, on the app's side
    page.click("#encrypt-btn")
    ct = _wait_text(page, "ct-out", "all the server will get")
    assert "bytes" in ct and SMILES in ct
    page.click("#run-btn")
    assert "Computed in FHE on the server" in _wait_text(page, "run-out", "Computed in FHE")
    page.click("#decrypt-btn")
    result = _wait_text(page, "result-out", "raw outputs")

    # the decrypted prediction shown is the one the pipeline computes for this molecule
    sim = Simulator(bundle)
    raw, values = sim([SMILES])
    cfg = sim.compiled.config
    if cfg.rounding_bits is None or cfg.rounding_method != "approximate":  # the tiny bundle: exact simulation
        assert describe(sim.task, values[0]) in result
        assert ", ".join(f"{v:.4f}" for v in raw[0]) in result
    else:  # approximate rounding is simulated with randomness: the class must agree
        assert describe(sim.task, values[0]).split(" (")[0] in result

    shot = Path(os.environ.get("MOLCLOAK_SCREENSHOT") or tmp_path / "app.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # an invalid SMILES shows the error, and the app keeps working
    page.fill("#smiles textarea", "C1CC(")
    _wait_text(page, "mol-status", "could not be parsed by RDKit")
    page.click("#encrypt-btn")
    page.get_by_text("could not be parsed by RDKit").last.wait_for()
    page.fill("#smiles textarea", "CCO")
    page.click("#predict-btn")
    result = _wait_text(page, "result-out", "CCO ·")
    _, values = sim(["CCO"])
    assert describe(sim.task, values[0]).split(" (")[0] in result

    # leaving the page ends the browser session: its key folder goes away
    sessions = state / "sessions"
    assert len(list(sessions.iterdir())) == 1
    page.goto("about:blank")
    deadline = time.monotonic() + 120
    while list(sessions.iterdir()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not list(sessions.iterdir()), "the session's keys outlived the closed page"

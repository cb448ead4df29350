"""The demo's HTML report and the live page, rendered by headless Chromium (selenium): their
images load and the live page updates without a reload; an operator works from it (a false
alarm clicked on a card, the same part passes; undo; the random-weights banner, thresholds,
charts, shadow agreement and drift). Skipped where Chromium is absent.

With CLIPINSPECT_SCREENSHOTS=DIR the tests also save what the browser shows, as 256-colour PNG
(docs/ holds the committed ones: report.png, live-page.png).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np

import pytest
from PIL import Image

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="chromium and chromium-driver are not installed "
                                "(apt-get install -y chromium chromium-driver)")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.bundle import Bundle  # noqa: E402
from clipinspect.runtime.core.images import EncodedImage  # noqa: E402
from clipinspect.runtime.core.inspector import InspectionResult  # noqa: E402
from clipinspect.runtime.serving.server import ServeConfig  # noqa: E402
from clipinspect.runtime.serving.ui import LiveFeed, ui_routes  # noqa: E402
from test_serve import KEY, Live, png, post  # noqa: E402
from tinybundle import build_tiny_bundle  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER),
                              options=options)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> None:
    """Saved as a 256-colour PNG: small enough for docs/."""
    folder = os.environ.get("CLIPINSPECT_SCREENSHOTS")
    if folder:
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        image.quantize(256, dither=Image.Dither.FLOYDSTEINBERG).save(Path(folder) / name,
                                                                     optimize=True)


def wait_for(condition, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except StaleElementReferenceException:  # the page re-rendered between find and read
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("the page did not reach the expected state in time")


def loaded_images(driver, selector: str) -> list:
    """Images under ``selector`` that the browser decoded (natural size > 0)."""
    return [i for i in driver.find_elements(By.CSS_SELECTOR, selector)
            if driver.execute_script("return arguments[0].complete && "
                                     "arguments[0].naturalWidth > 0", i)]


@pytest.fixture(scope="module")
def demo_run(tiny_bundle_path, tmp_path_factory):
    """CLIPINSPECT_REPORT_DIR: a real demo output to check instead of the tiny-bundle demo."""
    given = os.environ.get("CLIPINSPECT_REPORT_DIR")
    if given:
        return Path(given), json.loads((Path(given) / "report.json").read_text()), ""
    pytest.importorskip("torch", reason="the demo needs the export extra")
    from test_demo import run_demo_quietly

    return run_demo_quietly(tiny_bundle_path, tmp_path_factory.mktemp("demo") / "out")


def test_the_demo_report_renders_its_table_histograms_and_sheets(browser, demo_run):
    out, report, _ = demo_run
    browser.get((out / "report.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#summary tr")
    assert len(rows) == 1 + len(report["categories"])
    cells = [c.text for c in rows[1].find_elements(By.TAG_NAME, "td")]
    assert cells[2].endswith("%") and cells[3].endswith("%")
    sheets = loaded_images(browser, "img.sheet")
    assert len(sheets) == len(report["categories"])
    assert all(s.size["width"] > 300 for s in sheets)
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.hist line.threshold")) == len(sheets)
    screenshot(browser, "report.png")


def test_the_live_page_shows_inspections_and_updates_without_reload(browser, tiny_bundle_path):
    server = Live(Inspector.open(tiny_bundle_path, threads=2),
                  ServeConfig(max_batch=4, max_wait_ms=20, api_key=KEY))
    try:
        browser.get(server.url + "/ui")
        wait_for(lambda: browser.find_element(By.ID, "keybox").is_displayed())
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.ID, "usekey").click()
        # Overlays are rendered only while the page polls: wait until it does, with the key.
        wait_for(lambda: browser.find_element(By.ID, "tput").text != "-")
        for i in range(3):
            assert post(server.url, png(i, 96)).status_code == 200
        wait_for(lambda: len(loaded_images(browser, "#grid .card img")) == 3)
        counts = browser.find_element(By.CSS_SELECTOR, "#counts tbody").text
        assert counts.startswith("weave 3")
        assert browser.find_element(By.ID, "p99").text not in ("", "-")
        first = browser.find_element(By.CSS_SELECTOR, "#grid .card").get_attribute("data-seq")
        for i in range(3, 5):  # the page polls: new inspections appear without a reload
            assert post(server.url, png(i, 96)).status_code == 200
        wait_for(lambda: len(loaded_images(browser, "#grid .card img")) == 5)
        newest = browser.find_element(By.CSS_SELECTOR, "#grid .card").get_attribute("data-seq")
        assert int(newest) == int(first) + 2
        assert browser.find_element(By.CSS_SELECTOR, "#counts tbody").text.startswith("weave 5")
    finally:
        server.stop()


# ---------------------------------------------------------------------- the operator's page

def part(kind: str, shift: int = 0) -> bytes:
    """A 64 px part: a smooth gradient (the good parts) or a checkerboard (flagged)."""
    y, x = np.mgrid[0:64, 0:64]
    if kind == "gradient":
        rgb = np.stack([x * 4, y * 4, (x + y) * 2], -1) + shift
    else:
        rgb = (((x // 8 + y // 8) % 2) * 255)[..., None].repeat(3, -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def flagging_bundle(tmp_path):
    """weave with three gradient references and an image threshold between a gradient's score
    and the checkerboard's: the checkerboard is NG until it joins the references."""
    path = tmp_path / "bundle"
    build_tiny_bundle(path, ["weave", "washer"])
    inspector = Inspector.open(path)
    inspector.add_references("weave", [EncodedImage(part("gradient", 10 * i)) for i in range(3)])

    def scored(image: bytes) -> float:
        return Inspector.open(path).inspect(EncodedImage(image), "weave")[0].image_score

    bad, good = scored(part("checker")), max(scored(part("gradient", 5)), 0.0)
    assert good < bad
    Bundle.open(path).set_thresholds("weave", "fp32/few-shot",
                                     {"image": (good + bad) / 2, "method": "test"})
    return path


def inspect_part(url: str, image: bytes) -> dict:
    r = post(url, image)
    assert r.status_code == 200, r.text
    return r.json()


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#grid .card")


def open_with_key(driver, url: str) -> None:
    driver.get(url + "/ui")
    wait_for(lambda: driver.find_element(By.ID, "keybox").is_displayed())
    driver.find_element(By.ID, "key").send_keys(KEY)
    driver.find_element(By.ID, "usekey").click()
    wait_for(lambda: driver.find_element(By.ID, "tput").text != "-")


def test_an_operator_clicks_a_false_alarm_and_the_same_part_then_passes(browser,
                                                                        flagging_bundle,
                                                                        tmp_path):
    candidate = tmp_path / "candidate"
    build_tiny_bundle(candidate, ["weave", "washer"], seed=3)
    server = Live(Inspector.open(flagging_bundle),
                  ServeConfig(max_batch=4, max_wait_ms=20, api_key=KEY),
                  shadow=Inspector.open(candidate))
    try:
        open_with_key(browser, server.url)
        assert Bundle.open(flagging_bundle).manifest.model.weights.kind == "random"
        banner = browser.find_element(By.ID, "random")
        assert banner.is_displayed() and "RANDOM weights" in banner.text
        identity = Bundle.open(flagging_bundle).identity
        for i in range(2):
            inspect_part(server.url, part("gradient", 3 + i))
        flagged = inspect_part(server.url, part("checker"))
        assert flagged["is_anomalous"] is True
        assert identity in browser.find_element(By.ID, "bundle").text
        card = wait_for(lambda: [c for c in cards(browser)
                                 if c.get_attribute("data-image-id") == flagged["image_id"]])[0]
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "NG"
        assert [b.text for b in card.find_elements(By.CSS_SELECTOR, "button.feedback")] == [
            "false alarm", "confirmed defect"]
        card.find_element(By.CSS_SELECTOR, "button[data-label=false_alarm]").click()

        def answered():  # kept across the redraws that follow (the state carries it)
            c = cards(browser)[0]
            text = c.find_element(By.CSS_SELECTOR, ".answer").text
            # Read in one go: the page may redraw the card between two reads (stale element).
            done = (text.startswith("false alarm: memory") and "(4 refs)" in c.text
                    and all(not b.is_enabled() for b in c.find_elements(By.CSS_SELECTOR,
                                                                         "button")))
            return c if done else None
        card = wait_for(answered)
        after = inspect_part(server.url, part("checker"))
        assert after["is_anomalous"] is False
        assert wait_for(lambda: any(
            after["memory"][:12] in c.find_element(By.CSS_SELECTOR, ".answer").text
            for c in cards(browser) if c.get_attribute("data-image-id") == flagged["image_id"]))
        newest = wait_for(lambda: (cards(browser)[0]
                                   if cards(browser)[0].get_attribute("data-image-id")
                                   == after["image_id"] else None))
        assert newest.find_element(By.CSS_SELECTOR, ".verdict").text == "OK"
        assert [b.text for b in newest.find_elements(By.CSS_SELECTOR, "button.feedback")] == [
            "missed defect"]
        old = [c for c in cards(browser) if c.get_attribute("data-image-id")
               == flagged["image_id"]][0]
        assert old.find_element(By.CSS_SELECTOR, ".answer").text.startswith("false alarm")

        weave = browser.find_element(By.CSS_SELECTOR, ".category[data-category=weave]")
        assert "image threshold" in weave.find_element(By.CSS_SELECTOR, ".info").text
        assert weave.find_element(By.CSS_SELECTOR, ".cbar").is_displayed()
        wait_for(lambda: len(weave.find_elements(By.CSS_SELECTOR, "svg.chart circle")) == 4)
        assert len(weave.find_elements(By.CSS_SELECTOR, "svg.chart line.threshold")) == 1
        assert len(weave.find_elements(By.CSS_SELECTOR, "svg.chart circle.NG")) == 1
        wait_for(lambda: browser.find_element(By.ID, "shadow").is_displayed())
        wait_for(lambda: browser.find_element(By.ID, "shadow-scored").text == "4")
        assert browser.find_element(By.ID, "drift").is_displayed()  # serve always watches
        screenshot(browser, "live-page.png")

        weave.find_element(By.CSS_SELECTOR, "button.undo").click()
        undone = wait_for(lambda: (lambda t: t if t.startswith("undone") else None)(
            weave.find_element(By.CSS_SELECTOR, ".memory .answer").text))
        assert flagged["memory"][:12] in undone and "(3 refs)" in undone
        assert inspect_part(server.url, part("checker"))["is_anomalous"] is True
        weave.find_element(By.CSS_SELECTOR, "button.undo").click()
        wait_for(lambda: "nothing to undo" in weave.find_element(
            By.CSS_SELECTOR, ".memory .answer").text)
        assert "error" in weave.find_element(By.CSS_SELECTOR, ".memory .answer").get_attribute(
            "class")
    finally:
        server.stop()


class PageOnly:
    """The page and its state from a given LiveFeed, on loopback without a model."""

    def __init__(self, feed: LiveFeed):
        import uvicorn
        from starlette.applications import Starlette

        def endpoint(name, handler, auth: bool = False):
            return handler
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(Starlette(routes=ui_routes(feed, endpoint)), host="127.0.0.1",
                                port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def test_the_page_draws_drift_alarms_shadow_disagreements_and_escapes_text(browser):
    feed = LiveFeed()
    feed.bundle = {"identity": "<b>x</b>", "precision": "fp32", "model": "m",
                   "weights": "file"}
    for i, score in enumerate((0.2, 0.3, 0.9, 0.25)):
        feed.record("washer", InspectionResult(str(i), image_score=score,
                                               is_anomalous=score > 0.5),
                    {"image": 0.5, "pixel": 0.4}, 0.01)
    now = time.time()
    feed.providers["drift"] = lambda: {"rows": [
        {"category": "washer", "source": "http", "statistic": "score", "reference_n": 200,
         "window_n": 50, "value": 0.41, "p_value": 1e-5, "alarm": True, "raised_at": now},
        {"category": "washer", "source": "http", "statistic": "brightness", "reference_n": 200,
         "window_n": 50, "value": 0.05, "p_value": 0.7, "alarm": False, "raised_at": None}],
        "alarms": []}
    feed.providers["shadow"] = lambda: {
        "bundle": "candidate-1", "scored": 4, "dropped": 1, "failed": 0, "verdicts_compared": 4,
        "verdict_agreement": 0.75, "score_correlation": 0.9,
        "disagreements": [{"image_id": "<img src=x>", "category": "washer", "time": now,
                           "active": {"score": 0.9, "verdict": "NG"},
                           "shadow": {"score": 0.4, "verdict": "OK"}}]}
    page = PageOnly(feed)
    try:
        browser.get(page.url + "/ui")
        wait_for(lambda: browser.find_element(By.ID, "agreement").text.startswith("75.0 %"))
        assert not browser.find_element(By.ID, "random").is_displayed()  # weights from a file
        assert "<b>x</b>" in browser.find_element(By.ID, "bundle").text  # shown, not parsed
        assert browser.find_element(By.ID, "correlation").text == "0.9"
        assert "<img src=x>" in browser.find_element(By.ID, "disagreements").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#drift-table tbody tr")
        assert len(rows) == 2 and "ALARM" in rows[0].text
        assert "alarm" in rows[0].get_attribute("class")
        chart = browser.find_element(By.CSS_SELECTOR, ".category[data-category=washer] svg.chart")
        assert len(chart.find_elements(By.CSS_SELECTOR, "line.drift-alarm")) == 1
        assert len(chart.find_elements(By.CSS_SELECTOR, "line.threshold")) == 1
        assert len(chart.find_elements(By.CSS_SELECTOR, "circle.NG")) == 1
        labels = browser.find_element(By.CSS_SELECTOR, ".category[data-category=washer] "
                                                       ".cbar-labels").text
        assert "pixel threshold 0.4" in labels
        card = browser.find_element(By.CSS_SELECTOR, "#grid .card")
        assert card.find_elements(By.CSS_SELECTOR, "button") == []  # no image id: no feedback
        assert not browser.find_element(By.CSS_SELECTOR, ".category .memory").is_displayed()
    finally:
        page.stop()

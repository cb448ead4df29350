"""The demo's HTML report and the live page, rendered by headless Chromium (selenium): their
images load and the live page updates without a reload. Skipped where Chromium is absent.

With CLIPINSPECT_SCREENSHOTS=DIR the tests also save what the browser shows (docs/ holds the
committed ones: report.png, live-page.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

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
from clipinspect.runtime.serving.server import ServeConfig  # noqa: E402
from test_serve import KEY, Live, png, post  # noqa: E402


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
    folder = os.environ.get("CLIPINSPECT_SCREENSHOTS")
    if folder:
        driver.save_screenshot(str(Path(folder) / name))


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
        screenshot(browser, "live-page.png")
    finally:
        server.stop()

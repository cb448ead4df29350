"""``/ui``: the live page of ``clipinspect serve`` and its data, ``/ui/state.json`` (latest
overlays, verdicts, counts per category, throughput, latency percentiles, thresholds, score
history, the bundle, each card's feedback, what providers add), which needs the API key where one
is set. The page is checked in a real browser in test_browser.py."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.core.inspector import InspectionResult  # noqa: E402
from clipinspect.runtime.serving.server import ServeConfig  # noqa: E402
from clipinspect.runtime.serving.ui import LiveFeed  # noqa: E402
from test_serve import KEY, Live, png, post  # noqa: E402


@pytest.fixture(scope="module")
def live(tiny_bundle_path):
    server = Live(Inspector.open(tiny_bundle_path, threads=2),
                  ServeConfig(max_batch=4, max_wait_ms=20, api_key=KEY))
    yield server
    server.stop()


def state(url: str, key: str | None = KEY) -> httpx.Response:
    return httpx.get(url + "/ui/state.json", headers={"X-API-Key": key} if key else {})


def test_the_page_is_public_and_self_contained_but_its_data_needs_the_key(live):
    page = httpx.get(live.url + "/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    assert state(live.url, key=None).status_code == 401
    assert state(live.url, key="wrong").status_code == 401
    assert state(live.url).status_code == 200


def test_state_shows_the_latest_inspections_with_overlays_and_counts(live):
    before = state(live.url).json()
    for i in range(3):
        assert post(live.url, png(i)).status_code == 200
    for _ in range(50):  # the record is made after each answer is sent
        s = state(live.url).json()
        if s["seq"] == before["seq"] + 3:
            break
    assert s["seq"] == before["seq"] + 3
    assert s["counts"]["weave"]["inspected"] - before.get("counts", {}).get(
        "weave", {"inspected": 0})["inspected"] == 3
    newest = s["latest"][0]
    assert newest["category"] == "weave" and newest["verdict"] == "no threshold"
    assert newest["overlay_png"].startswith("data:image/png;base64,")
    assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
    assert s["throughput_per_s"] > 0


def test_feed_counts_verdicts_and_keeps_only_the_latest():
    feed = LiveFeed(latest=2)
    for i, flagged in enumerate((True, False, True)):
        result = InspectionResult(f"{i}", image_score=float(i), is_anomalous=flagged)
        feed.record("washer", result, {"image": 1.5}, 0.01 * (i + 1))
    s = feed.state()
    assert s["counts"] == {"washer": {"inspected": 3, "NG": 2, "OK": 1}}
    assert [r["image_score"] for r in s["latest"]] == [2.0, 1.0]
    assert s["latency_ms"]["p50"] == pytest.approx(20.0)


def test_overlays_are_rendered_only_while_the_page_is_watched():
    feed = LiveFeed()
    image = np.zeros((32, 32, 3), np.uint8)
    amap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)

    def result():
        return InspectionResult("x", image_score=0.5, anomaly_map=amap, image=image)

    feed.record("washer", result(), {}, 0.01)        # nobody has opened the page yet
    assert feed.state()["latest"][0]["overlay_png"] is None
    feed.record("washer", result(), {}, 0.01)        # the page polled just now
    assert feed.state()["latest"][0]["overlay_png"].startswith("data:image/png;base64,")


def test_state_carries_thresholds_history_feedback_and_what_providers_add():
    feed = LiveFeed()
    feed.bundle = {"identity": "b/1", "precision": "fp32", "model": "m", "weights": "random"}
    feed.providers["shadow"] = lambda: {"scored": 0}
    for i, flagged in enumerate((True, False)):
        feed.record("washer", InspectionResult(f"{i}", image_score=0.5 + i, is_anomalous=flagged),
                    {"image": 1.0, "pixel": 0.3}, 0.01, image_id=f"id{i}")
    feed.mark("id0", "false_alarm", {"id": 7, "after": {"memory": "ab" * 32, "shots": 4}})
    s = feed.state()
    assert s["bundle"]["weights"] == "random" and s["shadow"] == {"scored": 0}
    assert s["thresholds"] == {"washer": {"image": 1.0, "pixel": 0.3}}
    assert [(score, verdict) for _, score, verdict in s["history"]["washer"]] == [
        (0.5, "NG"), (1.5, "OK")]
    assert s["operations"] is True  # results with image ids: serve's cards take feedback
    marked = [r for r in s["latest"] if r["image_id"] == "id0"][0]
    assert marked["feedback"] == {"label": "false_alarm", "id": 7, "memory": "ab" * 6,
                                  "shots": 4}
    assert [r for r in s["latest"] if r["image_id"] == "id1"][0]["feedback"] is None


def test_a_station_feed_without_image_ids_offers_no_feedback():
    feed = LiveFeed()
    feed.record("washer", InspectionResult("x", image_score=0.1, is_anomalous=False),
                {"image": 1.0}, 0.01, verdict="OK")
    assert feed.state()["operations"] is False


def test_the_page_sets_text_never_markup_and_keeps_the_ids_the_tests_use():
    from clipinspect.runtime.serving.ui import PAGE

    assert "innerHTML" not in PAGE and "outerHTML" not in PAGE and "insertAdjacentHTML" not in PAGE
    for name in ("keybox", "key", "usekey", "tput", "p50", "p99", "status", "counts", "health",
                 "grid", "random", "bundle", "categories", "shadow", "drift", "agreement"):
        assert f'id="{name}"' in PAGE
    for endpoint in ("v1/feedback", "v1/memory/undo", "ui/state.json"):
        assert f'"{endpoint}"' in PAGE  # relative: the page works behind a path prefix

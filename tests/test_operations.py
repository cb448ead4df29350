"""The line learns (issue: operator feedback, shadow bundle, promote and rollback) on a real
``serve`` on loopback: a good part flagged, one click, the same part no longer flagged, undo
restores the memory and the verdict exactly; requests during the swap each scored with one
memory; a shadow changes no served verdict; promote under load loses no request."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.cli import main  # noqa: E402
from clipinspect.runtime.core.bundle import Bundle  # noqa: E402
from clipinspect.runtime.core.errors import ClipInspectError  # noqa: E402
from clipinspect.runtime.core.images import EncodedImage  # noqa: E402
from clipinspect.runtime.core.memory_book import (FeedbackError, FeedbackPolicy,  # noqa: E402
                                                  MemoryBook)
from clipinspect.runtime.serving.journal import Journal  # noqa: E402
from clipinspect.runtime.serving.routes import check_shadow  # noqa: E402
from clipinspect.runtime.serving.server import ServeConfig  # noqa: E402

from test_serve import Live  # noqa: E402
from tinybundle import build_tiny_bundle  # noqa: E402

KEY = "ops-key"
CATEGORY = "weave"


def picture(kind: str, seed: int = 0) -> bytes:
    y, x = np.mgrid[0:64, 0:64]
    if kind == "gradient":
        a = np.stack([x * 4, y * 4, (x + y) * 2], -1) + seed
    else:
        a = (((x // (8 + seed) + y // (8 + seed)) % 2) * 255)[..., None].repeat(3, -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def score(path, image: bytes) -> float:
    return Inspector.open(path).inspect(EncodedImage(image), CATEGORY)[0].image_score


@pytest.fixture()
def bundle(tmp_path):
    """A tiny bundle with three gradient references; a threshold that flags the checkerboard
    and that the checkerboard, once a reference, passes."""
    path = tmp_path / "bundle"
    build_tiny_bundle(path, ["weave", "washer"])
    inspector = Inspector.open(path)
    inspector.add_references(CATEGORY, [EncodedImage(picture("gradient", 10 * i))
                                        for i in range(3)])
    flagged = score(path, picture("checker"))
    good = max(score(path, picture("gradient", 5)), 0.0)
    assert good < flagged
    Bundle.open(path).set_thresholds(CATEGORY, "fp32/few-shot",
                                     {"image": (good + flagged) / 2, "method": "test"})
    return path


def inspect(url: str, image: bytes) -> dict:
    r = httpx.post(url + "/v1/inspect", content=image, params={"category": CATEGORY},
                   headers={"Content-Type": "image/png", "X-API-Key": KEY}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def call(url: str, path: str, body: dict | None = None, method: str = "POST") -> httpx.Response:
    return httpx.request(method, url + path, json=body, headers={"X-API-Key": KEY}, timeout=120)


def test_a_false_alarm_clicked_joins_the_memory_and_undo_restores_it_exactly(bundle, tmp_path):
    live = Live(Inspector.open(bundle), ServeConfig(max_batch=4, max_wait_ms=20, api_key=KEY,
                                                   journal=tmp_path / "j.sqlite"))
    try:
        part = picture("checker")
        first = inspect(live.url, part)
        assert first["is_anomalous"] is True
        # Feedback needs the key; an unknown result is a 404 that says what is kept.
        assert httpx.post(live.url + "/v1/feedback", json={}).status_code == 401
        missing = call(live.url, "/v1/feedback", {"image_id": "nope", "label": "false_alarm"})
        assert missing.status_code == 404 and "last 64 results" in missing.text
        r = call(live.url, "/v1/feedback", {"image_id": first["image_id"],
                                            "label": "false_alarm", "who": "anna"})
        assert r.status_code == 200, r.text
        change = r.json()
        assert change["before"]["memory"] == first["memory"]
        assert change["after"]["shots"] == 4 and change["who"] == "anna"
        assert str(bundle) not in r.text
        again = inspect(live.url, part)
        assert again["is_anomalous"] is False
        assert again["memory"] == change["after"]["memory"]
        assert again["image_score"] == score(bundle, part)  # the bundle on disk has it too
        memory = call(live.url, f"/v1/memory?category={CATEGORY}", method="GET").json()
        assert memory["shots"] == 4 and [e["action"] for e in memory["log"]] == ["false_alarm"]

        undo = call(live.url, "/v1/memory/undo", {"category": CATEGORY, "who": "anna"})
        assert undo.status_code == 200, undo.text
        assert undo.json()["after"]["memory"] == first["memory"]
        restored = inspect(live.url, part)
        assert restored["memory"] == first["memory"]
        assert restored["image_score"] == first["image_score"]
        assert restored["is_anomalous"] is True
        nothing = call(live.url, "/v1/memory/undo", {"category": CATEGORY})
        assert nothing.status_code == 409 and "nothing to undo" in nothing.text
    finally:
        live.stop()
    events = Journal(tmp_path / "j.sqlite").events("memory")
    assert [e["detail"]["action"] for e in events] == ["false_alarm", "undo"]


def test_requests_during_the_swap_are_each_scored_with_one_memory(bundle):
    others = [picture("checker", 1 + i % 3) for i in range(24)]
    before = {i: score(bundle, im) for i, im in enumerate(others)}
    live = Live(Inspector.open(bundle), ServeConfig(max_batch=4, max_wait_ms=5, api_key=KEY))
    try:
        first = inspect(live.url, picture("checker"))
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(inspect, live.url, im) for im in others]
            click = call(live.url, "/v1/feedback", {"image_id": first["image_id"],
                                                    "label": "false_alarm"})
            answers = [f.result() for f in futures]
        assert click.status_code == 200, click.text
    finally:
        live.stop()
    after = {i: score(bundle, im) for i, im in enumerate(others)}
    digests = {first["memory"]: before, click.json()["after"]["memory"]: after}
    assert len(answers) == len(others)  # every request answered
    for i, a in enumerate(answers):
        # Scored with the memory it names, exactly: never a mix of the two.
        assert a["image_score"] == digests[a["memory"]][i]


def test_the_memory_is_bounded_and_the_cli_shows_logs_and_undoes(bundle, capsys):
    inspector = Inspector.open(bundle)
    book = MemoryBook(bundle)
    policy = FeedbackPolicy(max_shots=4)
    for i in range(3):
        row = book.feedback(inspector, CATEGORY, picture("checker", i), "false_alarm",
                            who="op", policy=policy)
    assert row["after"]["shots"] == 4
    assert len(row["evicted"]) == 1 and row["evicted"][0].startswith("feedback/")
    with pytest.raises(FeedbackError, match="full"):
        book.feedback(inspector, CATEGORY, picture("checker", 5), "false_alarm", who="op",
                      policy=FeedbackPolicy(max_shots=3))
    assert main(["memory", "log", str(bundle), "--category", CATEGORY]) == 0
    out = capsys.readouterr().out
    assert out.count("false_alarm") == 3
    assert main(["memory", "undo", str(bundle), "--category", CATEGORY, "--who", "kim"]) == 0
    assert "undo" in capsys.readouterr().out
    assert book.state(inspector, CATEGORY)["memory"] == row["before"]["memory"]
    # A confirmed defect changes no memory and lands in the labelled set.
    image = bundle.parent / "defect.png"
    image.write_bytes(picture("checker", 7))
    assert main(["feedback", str(bundle), str(image), "--category", CATEGORY,
                 "--label", "confirmed-defect"]) == 0
    kept = list((bundle / "feedback" / "labelled" / CATEGORY / "test" / "defect").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == image.read_bytes()
    assert main(["memory", "show", str(bundle), "--category", CATEGORY]) == 0
    assert "4 reference images" in capsys.readouterr().out


def test_refit_policy_refits_from_the_recorded_normal_images(bundle, tmp_path):
    from clipinspect.runtime.core.thresholds import from_normal_images

    normal = []
    for i in range(6):
        normal.append(tmp_path / f"n{i}.png")
        normal[-1].write_bytes(picture("gradient", 3 * i + 1))
    inspector = Inspector.open(bundle)
    fit = from_normal_images(inspector, CATEGORY, normal, 0.0, "few-shot")
    assert fit["normal_images"] == [str(p.resolve()) for p in normal]
    inspector.bundle.set_thresholds(CATEGORY, "fp32/few-shot", fit)
    row = MemoryBook(bundle).feedback(inspector, CATEGORY, picture("checker"), "false_alarm",
                                      who="op", policy=FeedbackPolicy("refit"))
    assert row["refit"] == ["fp32/few-shot"]
    new = row["after"]["thresholds"]["fp32/few-shot"]
    assert new["feedback_references"] == 1 and new["images"] == 7
    # The refit threshold is what threshold fitting gives with the new memory.
    expected = from_normal_images(Inspector.open(bundle), CATEGORY,
                                  normal + [bundle / row["image"]], 0.0, "few-shot")
    assert new["image"] == expected["image"]


def shadow_bundle(tmp_path):
    path = tmp_path / "candidate"
    build_tiny_bundle(path, ["weave", "washer"], seed=3)
    return path


def test_a_shadow_changes_no_served_verdict_and_promote_under_load_loses_nothing(bundle,
                                                                                 tmp_path):
    candidate = shadow_bundle(tmp_path)
    parts = [picture("checker", i % 4) for i in range(12)] + [picture("gradient", 7)]
    plain = Live(Inspector.open(bundle), ServeConfig(max_batch=4, api_key=KEY))
    try:
        without = [inspect(plain.url, p) for p in parts]
    finally:
        plain.stop()
    live = Live(Inspector.open(bundle), ServeConfig(max_batch=4, api_key=KEY,
                                                   journal=tmp_path / "j.sqlite"),
                shadow=Inspector.open(candidate))
    try:
        with_shadow = [inspect(live.url, p) for p in parts]
        for a, b in zip(without, with_shadow):
            assert (a["image_score"], a["is_anomalous"]) == (b["image_score"], b["is_anomalous"])
        state = call(live.url, "/v1/shadow", method="GET").json()
        assert state["scored"] + state["dropped"] == len(parts)
        assert state["bundle"] == Bundle.open(candidate).identity
        scrape = call(live.url, "/metrics", method="GET").text
        assert "clipinspect_shadow_scored " in scrape and "clipinspect_shadow_dropped " in scrape

        stop, answers, failures = threading.Event(), [], []

        def client() -> None:
            while not stop.is_set():
                try:
                    answers.append(inspect(live.url, parts[len(answers) % len(parts)]))
                except AssertionError as e:
                    failures.append(str(e))
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        promoted = call(live.url, "/v1/admin/promote", {"who": "lead"})
        served_after = inspect(live.url, parts[0])
        rolled = call(live.url, "/v1/admin/rollback", {"who": "lead"})
        stop.set()
        for t in threads:
            t.join(60)
        assert promoted.status_code == 200 and rolled.status_code == 200, promoted.text
        assert failures == [] and len(answers) > 0
        assert served_after["bundle"]["identity"] == Bundle.open(candidate).identity
        assert inspect(live.url, parts[0])["bundle"]["identity"] == Bundle.open(bundle).identity
        assert call(live.url, "/v1/admin/rollback").status_code == 409
    finally:
        live.stop()
    kinds = [e["kind"] for e in Journal(tmp_path / "j.sqlite").events()]
    assert kinds == ["promote", "rollback"]


def test_without_a_shadow_promote_says_how_to_start_one(bundle):
    live = Live(Inspector.open(bundle), ServeConfig(api_key=KEY))
    try:
        r = call(live.url, "/v1/admin/promote")
        assert r.status_code == 409 and "--shadow" in r.text
        assert httpx.get(live.url + "/", follow_redirects=False).headers["location"] == "/ui"
    finally:
        live.stop()


def test_a_shadow_missing_a_category_is_refused_at_start(bundle, tmp_path):
    path = tmp_path / "one"
    build_tiny_bundle(path, ["weave"])
    with pytest.raises(ClipInspectError, match="lacks the categories washer"):
        check_shadow(Inspector.open(bundle), Inspector.open(path))


def test_a_running_watch_takes_up_feedback_given_from_the_command_line(bundle, tmp_path):
    import json
    import time

    from clipinspect.runtime.serving.journal import JsonlSink
    from clipinspect.runtime.serving.watch import FolderWatcher

    folder, part = tmp_path / "in", tmp_path / "part.png"
    folder.mkdir()
    part.write_bytes(picture("checker"))
    journal = Journal(tmp_path / "j.sqlite")
    watcher = FolderWatcher(Inspector.open(bundle), folder, CATEGORY, journal,
                            JsonlSink(tmp_path / "r.jsonl", journal, "watch"), None,
                            settle=0.0)

    def watched(name: str) -> dict:
        (folder / name).write_bytes(part.read_bytes())
        for _ in range(20):
            if watcher.poll():
                break
            time.sleep(0.1)
        return json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])

    assert watched("a.png")["is_anomalous"] is True
    assert main(["feedback", str(bundle), str(part), "--category", CATEGORY,
                 "--label", "false-alarm", "--who", "lee"]) == 0
    assert watched("b.png")["is_anomalous"] is False  # the next batch has the new memory
    assert main(["memory", "undo", str(bundle), "--category", CATEGORY]) == 0
    assert watched("c.png")["is_anomalous"] is True


def test_the_labelled_set_of_feedback_sets_an_image_threshold(bundle, capsys):
    pytest.importorskip("clipinspect.calibration.cli")
    inspector = Inspector.open(bundle)
    book = MemoryBook(bundle)
    for i in range(2):
        book.feedback(inspector, CATEGORY, picture("gradient", 40 + i), "false_alarm", who="op")
    for i in range(2):
        book.feedback(inspector, CATEGORY, picture("checker", 2 + i), "confirmed_defect",
                      who="op")
    labelled = bundle / "feedback" / "labelled"
    assert main(["threshold", str(bundle), "--category", CATEGORY, "--validation",
                 str(labelled), "--mode", "few-shot"]) == 0
    out = capsys.readouterr().out
    assert "pixel threshold not set (no masks)" in out
    t = Bundle.open(bundle).manifest.categories[CATEGORY].thresholds["fp32/few-shot"]
    assert t.image is not None and t.pixel is None and t.extra["image_level_labels"] is True


def brighter(image: bytes, gain: float) -> bytes:
    a = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a * gain + 40 * (gain - 1), 0, 255).astype(np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


def test_a_lighting_change_raises_a_drift_alarm_in_metrics_the_journal_and_the_page(bundle,
                                                                                   tmp_path):
    live = Live(Inspector.open(bundle), ServeConfig(max_batch=4, api_key=KEY, drift_reference=20,
                                                   drift_window=20,
                                                   journal=tmp_path / "j.sqlite"))
    try:
        rng = np.random.default_rng(0)
        for i in range(40):  # a stationary stream: the reference, then a window like it
            inspect(live.url, picture("gradient", int(rng.integers(0, 20))))
        assert 'clipinspect_drift_alarm{category="weave",source="http",statistic="brightness"}' \
            ' 0.0' in call(live.url, "/metrics", method="GET").text
        for i in range(40):  # the lamp brightens
            inspect(live.url, brighter(picture("gradient", int(rng.integers(0, 20))), 1.3))
        scrape = call(live.url, "/metrics", method="GET").text
        assert 'statistic="brightness"} 1.0' in scrape
        state = call(live.url, "/ui/state.json", method="GET").json()
        assert any(a["statistic"] == "brightness" for a in state["drift"]["alarms"])
    finally:
        live.stop()
    events = Journal(tmp_path / "j.sqlite").events("drift")
    assert events and events[0]["detail"]["statistic"] in ("brightness", "contrast", "score",
                                                           "sharpness")

"""clipinspect serve: micro-batching, scores equal to offline inspection, bad input, auth,
backpressure, metrics, graceful shutdown, and a fuzz of the API from its OpenAPI schema."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from clipinspect.runtime import Inspector  # noqa: E402
from clipinspect.runtime.cli import main  # noqa: E402
from clipinspect.runtime.core.errors import UsageError  # noqa: E402
from clipinspect.runtime.core.images import EncodedImage, set_max_megapixels  # noqa: E402
from clipinspect.runtime.serving.journal import Journal  # noqa: E402
from clipinspect.runtime.serving.auth import check_exposure  # noqa: E402
from clipinspect.runtime.serving.batcher import Batcher, Job  # noqa: E402
from clipinspect.runtime.serving.errors import HTTPError  # noqa: E402
from clipinspect.runtime.serving.metrics import Metrics  # noqa: E402
from clipinspect.runtime.serving.server import (ServeConfig, create_app,  # noqa: E402
                                                uvicorn_config)

KEY = "test-key"
CATEGORY = "weave"


def png(seed: int, size: int = 48) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inspector(tiny_bundle_path):
    return Inspector.open(tiny_bundle_path, threads=2)


class Live:
    """A real uvicorn server in a thread, on a free loopback port."""

    def __init__(self, source, config: ServeConfig, wait_for: int = 200, **app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        uv_config = uvicorn_config(create_app(source, config, **app), "127.0.0.1", self.port,
                                   config)
        uv_config.log_level = "warning"
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz").status_code == wait_for:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"test server did not answer {wait_for} on /readyz")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)


@pytest.fixture(scope="module")
def journal_path(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "journal.sqlite"


@pytest.fixture(scope="module")
def live(inspector, journal_path):
    server = Live(inspector, ServeConfig(max_batch=4, max_wait_ms=50, max_queue=16,
                                         max_body_bytes=100_000, api_key=KEY,
                                         journal=journal_path))
    yield server
    server.stop()


def post(url: str, body: bytes, key: str | None = KEY, **params) -> httpx.Response:
    headers = {"Content-Type": "image/png"} | ({"X-API-Key": key} if key else {})
    return httpx.post(url + "/v1/inspect", content=body, params={"category": CATEGORY} | params,
                      headers=headers, timeout=120)


def test_concurrent_requests_are_batched_and_equal_offline(live, inspector, journal_path):
    images = [png(i) for i in range(3)]
    offline = [inspector.inspect(EncodedImage(b), CATEGORY, batch_size=1)[0].image_score
               for b in images]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: post(live.url, images[i % 3]), range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    bodies = [r.json() for r in responses]
    assert max(b["batch_size"] for b in bodies) > 1  # requests did share batches
    # Exact: an image's score does not depend on what else is in its batch.
    assert [b["image_score"] for b in bodies] == [offline[i % 3] for i in range(6)]
    b = bodies[0]
    assert b["bundle"]["identity"] == inspector.bundle.identity
    assert b["threshold"] is None and b["is_anomalous"] is None  # no threshold set
    # The Inspector's stage name, and the name it had before (kept for existing clients).
    assert set(b["timings_ms"]) == {"load", "queue", "inference", "total", "decode"}
    assert b["timings_ms"]["decode"] == b["timings_ms"]["load"]
    # Every answer is in the journal under its image id.
    rows = {r["image_id"]: r for r in Journal(journal_path).rows("http")}
    for body in bodies:
        row = rows[body["image_id"]]
        assert (row["image_score"], row["category"], row["bundle"], row["error"]) == (
            body["image_score"], CATEGORY, inspector.bundle.identity, None)


def test_batches_mixing_categories_give_each_categorys_offline_scores(live, inspector):
    """A micro-batch of two categories is encoded once and split at the heads: every score
    still equals the image inspected alone under its own category."""
    images = [png(10 + i) for i in range(4)]
    categories = ["weave", "washer"]
    offline = {(i, c): inspector.inspect(EncodedImage(images[i]), c, batch_size=1)[0].image_score
               for i in range(4) for c in categories}
    requests = [(i % 4, categories[(i // 4 + i) % 2]) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: post(live.url, images[r[0]], category=r[1]),
                                  requests))
    bodies = [r.json() for r in responses]
    assert [b["category"] for b in bodies] == [c for _, c in requests]
    assert max(b["batch_size"] for b in bodies) > 1
    assert [b["image_score"] for b in bodies] == [offline[r] for r in requests]
    assert offline[0, "weave"] != offline[0, "washer"]


def test_multipart_and_heatmap(live):
    r = httpx.post(live.url + "/v1/inspect", files={"image": ("a.png", png(7), "image/png")},
                   data={"category": CATEGORY}, params={"heatmap": "true"},
                   headers={"X-API-Key": KEY}, timeout=120)
    assert r.status_code == 200, r.text
    heat = Image.open(io.BytesIO(base64.b64decode(r.json()["heatmap_png"])))
    assert heat.size == (48, 48)


@pytest.mark.parametrize("case", ["not an image", "truncated", "oversize", "unknown category",
                                  "no category", "bad mode", "few-shot without references",
                                  "empty", "json body", "multipart without image",
                                  "missing key", "wrong key"])
def test_bad_input_gets_4xx_json_and_serving_goes_on(live, case):
    good = png(3, 64)
    url = live.url + "/v1/inspect"
    key = {"X-API-Key": KEY}
    request = {
        "not an image": lambda: post(live.url, b"GIF89a definitely not"),
        "truncated": lambda: post(live.url, good[:len(good) // 2]),
        "oversize": lambda: post(live.url, b"\x89PNG" + bytes(200_000)),
        "unknown category": lambda: post(live.url, good, category="no-such-thing"),
        "no category": lambda: httpx.post(url, content=good, headers=key),
        "bad mode": lambda: post(live.url, good, mode="sideways"),
        "few-shot without references": lambda: post(live.url, good, mode="few-shot"),
        "empty": lambda: post(live.url, b""),
        "json body": lambda: httpx.post(url, json={"image": "x"}, params={"category": CATEGORY},
                                        headers=key),
        "multipart without image": lambda: httpx.post(url, files={"picture": ("a", good)},
                                                      data={"category": CATEGORY}, headers=key),
        "missing key": lambda: post(live.url, good, key=None),
        "wrong key": lambda: post(live.url, good, key="nope"),
    }[case]
    r = request()
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["status"] == r.status_code and error["message"]
    assert httpx.get(live.url + "/readyz").status_code == 200


def test_health_ready_and_metrics(live):
    assert httpx.get(live.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(live.url + "/readyz").json()["status"] == "ready"
    assert httpx.get(live.url + "/metrics").status_code == 401
    text = httpx.get(live.url + "/metrics", headers={"X-API-Key": KEY}).text
    for name in ("clipinspect_requests_total", "clipinspect_errors_total",
                 "clipinspect_request_seconds_bucket", "clipinspect_batch_size_bucket",
                 "clipinspect_batch_inference_seconds_bucket", "clipinspect_queue_depth"):
        assert name in text, name


def test_full_queue_answers_503_with_retry_after(inspector):
    config = ServeConfig(max_queue=2)
    batcher = Batcher(inspector, config, Metrics(config.max_batch), None)

    async def scenario():
        loaded = inspector.load(np.zeros((8, 8, 3), np.uint8))
        future = asyncio.get_running_loop().create_future()
        for _ in range(2):
            batcher.submit(Job(loaded, CATEGORY, "auto", "id", future))
        with pytest.raises(HTTPError) as e:
            batcher.submit(Job(loaded, CATEGORY, "auto", "id", future))
        return e.value

    error = asyncio.run(scenario())
    batcher.worker.shutdown()
    assert error.status == 503 and int(error.headers["Retry-After"]) >= 1


def test_other_addresses_require_an_api_key(tiny_bundle_path, capsys):
    with pytest.raises(UsageError, match="API key"):
        check_exposure("0.0.0.0", None)
    with pytest.raises(UsageError):
        check_exposure("192.168.1.20", None)
    assert "no API key" in check_exposure("127.0.0.1", None)
    assert "no API key" in check_exposure("::1", None)
    assert "required" in check_exposure("0.0.0.0", "k")
    # The command refuses before loading anything.
    assert main(["serve", str(tiny_bundle_path), "--host", "0.0.0.0"]) == 2
    assert "API key" in capsys.readouterr().err


def test_graceful_shutdown_finishes_queued_requests(inspector):
    server = Live(inspector, ServeConfig(max_batch=1, max_wait_ms=0, max_queue=16))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, server.url, png(10 + i), None) for i in range(3)]
        time.sleep(1.0)  # all three sent: one inferring, two queued
        server.stop()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 3
    assert not server.thread.is_alive()


def test_fuzz_api_from_openapi_schema(live):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    headers = {"X-API-Key": KEY}
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json", headers=headers)
    for path, method in (("/v1/inspect", "POST"), ("/metrics", "GET"), ("/readyz", "GET"),
                         ("/healthz", "GET")):
        operation = schema[path][method]

        @settings(max_examples=12 if method == "POST" else 3, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(base_url=live.url, headers=headers, timeout=120)
            # Documented status, content type and body schema; never a 5xx. Not "every
            # schema-valid request succeeds": a schema can say "binary", not "a decodable image",
            # so random bytes rightly get 400.
            case.validate_response(response, headers=headers,
                                   excluded_checks=[positive_data_acceptance])

        fuzz()
    assert httpx.get(live.url + "/readyz").status_code == 200


# ----------------------------------------------------------------- untrusted clients
def raw_request(port: int, declared: int, sent: bytes, path: str = "/v1/inspect") -> socket.socket:
    """A connection that declares a body of ``declared`` bytes and sends only ``sent``."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(f"POST {path}?category={CATEGORY} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 f"image/png\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
    return conn


def status_when_closed(conn: socket.socket) -> int:
    """The status of the answer, read until the server closes the connection (else timeout)."""
    conn.settimeout(20)
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    return int(answer.split(b"\r\n", 1)[0].split()[1])


def test_a_pixel_bomb_is_refused_before_decoding_and_maps_are_capped(inspector):
    bomb = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(bomb, format="PNG", optimize=True)
    server = Live(inspector, ServeConfig(max_map_side=32, max_body_bytes=1 << 20))
    try:
        set_max_megapixels(4)
        t0 = time.perf_counter()
        r = post(server.url, bomb.getvalue(), None, heatmap="true")
        assert r.status_code == 400 and time.perf_counter() - t0 < 10
        message = r.json()["error"]["message"]
        assert "3000x3000" in message and "--max-megapixels" in message
        # Within the limit: the score is the image's own; the heat map at most 32 pixels long.
        r = post(server.url, png(5, 48), None, heatmap="true")
        assert r.status_code == 200, r.text
        heat = Image.open(io.BytesIO(base64.b64decode(r.json()["heatmap_png"])))
        assert heat.size == (32, 32)
        offline = inspector.inspect(EncodedImage(png(5, 48)), CATEGORY)[0].image_score
        assert r.json()["image_score"] == offline
    finally:
        set_max_megapixels(None)
        server.stop()


def test_a_full_server_refuses_before_reading_and_slow_bodies_time_out(inspector):
    server = Live(inspector, ServeConfig(max_batch=1, max_queue=1, body_timeout_s=2.0))
    try:
        # Two clients hold the two slots (queue 1 + batch 1) by trickling their bodies.
        slow = [raw_request(server.port, 100_000, b"\x89PNG") for _ in range(2)]
        time.sleep(0.5)
        t0 = time.perf_counter()
        r = post(server.url, png(1) + bytes(50_000), None)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1 and time.perf_counter() - t0 < 1.5
        assert [status_when_closed(c) for c in slow] == [408, 408]  # after body_timeout_s
        assert post(server.url, png(1), None).status_code == 200  # the slots are free again
    finally:
        server.stop()


def _refused(conn: socket.socket) -> bool:
    """Whether the server already answered this held connection with 503."""
    conn.settimeout(0.3)
    try:
        return b" 503 " in conn.recv(200).split(b"\r\n", 1)[0]
    except TimeoutError:
        return False


def test_connections_beyond_the_limit_get_503(inspector):
    server = Live(inspector, ServeConfig(max_connections=3, body_timeout_s=10.0))
    held: list[socket.socket] = []
    try:
        # uvicorn counts every open connection (the one being answered included), and a
        # just-closed one may still count for a moment: open trickling clients until the
        # server refuses one, instead of assuming the exact count.
        refused = 0
        for _ in range(8):
            conn = raw_request(server.port, 100_000, b"x")
            if _refused(conn):
                refused += 1
                conn.close()
            else:
                held.append(conn)
        assert refused >= 5 and 1 <= len(held) <= 3
        assert post(server.url, png(1), None).status_code == 503
        for c in held:
            c.close()
        held.clear()
        deadline = time.time() + 10
        while post(server.url, png(1), None).status_code != 200:  # capacity comes back
            assert time.time() < deadline, "the server stayed full after the clients left"
            time.sleep(0.2)
    finally:
        for c in held:
            c.close()
        server.stop()


def test_the_port_answers_503_on_readyz_while_the_model_loads(inspector):
    loading = threading.Event()

    def load():
        loading.wait(60)
        return inspector

    server = Live(load, ServeConfig(), wait_for=503)
    try:
        r = httpx.get(server.url + "/readyz")
        assert r.json()["error"]["code"] == "not_ready" and r.headers["Retry-After"] == "1"
        assert post(server.url, png(1), None).status_code == 503
        assert httpx.get(server.url + "/healthz").status_code == 200
        loading.set()
        deadline = time.time() + 60
        while httpx.get(server.url + "/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert post(server.url, png(1), None).status_code == 200
    finally:
        loading.set()
        server.stop()


def test_serve_reports_a_bundle_that_cannot_load(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert "missing" in capsys.readouterr().err


def test_api_keys_outside_printable_ascii_are_refused_at_start(inspector):
    for key in ("cl\u00e9", "two words\n", " padded"):
        with pytest.raises(UsageError, match="printable ASCII"):
            create_app(inspector, ServeConfig(api_key=key))


def test_with_a_key_only_liveness_and_readiness_are_public(live, inspector):
    assert httpx.get(live.url + "/readyz").json() == {"status": "ready"}
    full = httpx.get(live.url + "/readyz", headers={"X-API-Key": KEY}).json()
    assert full["categories"] == inspector.bundle.categories
    assert httpx.get(live.url + "/openapi.json").status_code == 401
    assert httpx.get(live.url + "/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
    # A latin-1 header that is not the key is a 401, never a server error.
    r = httpx.post(live.url + "/v1/inspect", content=png(1),
                   headers={"X-API-Key": "test-k\u00e9y".encode("latin-1")})
    assert r.status_code == 401


def test_error_messages_do_not_show_the_bundle_path(live, inspector):
    r = post(live.url, png(2), mode="few-shot")
    assert r.status_code == 422
    assert str(inspector.bundle.root) not in r.text and "BUNDLE" in r.text

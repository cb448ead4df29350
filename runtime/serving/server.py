"""``clipinspect serve``: an HTTP inspection service (Starlette on uvicorn; the ``serve`` extra).

Requests are decoded and preprocessed as they arrive (thread pool), then queued. One inference
worker owns the onnxruntime session: it takes whatever is queued, up to ``max_batch`` (waiting at
most ``max_wait_ms`` for more when the queue runs dry), inspects it as one batch per category and
mode, and answers each request. Batch composition does not change a score: each image's score
depends on that image alone, and the tests check it against single-image inspection. A full
queue answers 503 with Retry-After at once instead of growing; bodies over the size limit get 413.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import math
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.errors import ClipInspectError, UsageError
from ..core.images import EncodedImage
from ..core.inspector import MODES, InspectionResult, Inspector, LoadedImage
from .journal import Entry, Journal
from ..core.maps import overlay
from ..predict import colour_range

API_KEY_HEADER = "X-API-Key"
MiB = 1 << 20


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_body_bytes: int = 32 * MiB
    api_key: str | None = None
    journal: str | Path | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None) -> str:
    """Refuse to serve another address without a key; returns the line to log about auth."""
    if api_key:
        return f"API key required in the {API_KEY_HEADER} header on /v1/* and /metrics"
    if not is_loopback(host):
        raise UsageError(f"--host {host} is reachable from other machines: an API key is "
                         "required there. Put one in a file and pass --api-key-file FILE (or set "
                         "CLIPINSPECT_API_KEY), or bind 127.0.0.1")
    return f"no API key: open to every process on this machine (loopback {host} only)"


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": {"status": e.status, "code": e.code, "message": e.message}},
                        e.status, headers=e.headers)


@dataclass
class Job:
    loaded: LoadedImage
    category: str
    mode: str
    image_id: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Done:
    result: InspectionResult
    batch_size: int
    queue_s: float
    inference_s: float


class Metrics:
    def __init__(self, max_batch: int):
        disable_created_metrics()  # *_created series only clutter a scrape
        self.registry = r = CollectorRegistry()
        self.requests = Counter("clipinspect_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("clipinspect_errors", "Requests answered with an error, by code",
                              ["code"], registry=r)
        self.latency = Histogram("clipinspect_request_seconds", "Request latency (server side)",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64))
        self.inference = Histogram("clipinspect_batch_inference_seconds",
                                   "Inference time of one batch", registry=r,
                                   buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("clipinspect_batch_size", "Images per inference batch",
                                    registry=r, buckets=[b for b in buckets if b <= max_batch])
        self.queue_depth = Gauge("clipinspect_queue_depth", "Requests waiting for the worker",
                                 registry=r)
        self.rejected = Counter("clipinspect_queue_rejections",
                                "Requests refused because the queue was full", registry=r)


class Batcher:
    """The bounded queue and the one inference worker."""

    def __init__(self, inspector: Inspector, config: ServeConfig, metrics: Metrics,
                 journal: Journal | None):
        self.inspector, self.config, self.metrics, self.journal = (inspector, config, metrics,
                                                                   journal)
        self.queue: asyncio.Queue[Job | None] = asyncio.Queue(config.max_queue)
        # The only thread that ever runs the session.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="clipinspect-infer")
        self.task: asyncio.Task | None = None
        self.per_image_s = 0.5  # running estimate, for Retry-After

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish everything queued, then stop the worker."""
        await self.queue.put(None)
        if self.task:
            await self.task
        self.worker.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.rejected.inc()
            wait = max(1, math.ceil(self.queue.qsize() * self.per_image_s))
            raise HTTPError(503, "queue_full", f"the inference queue is full "
                            f"({self.config.max_queue} requests waiting); retry after {wait} s",
                            {"Retry-After": str(wait)}) from None
        self.metrics.queue_depth.set(self.queue.qsize())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            job = await self.queue.get()
            if job is None:
                break
            batch = [job]
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if nxt is None:  # stop after this batch; the queue is drained in order
                    stopping = True
                    break
                batch.append(nxt)
            self.metrics.queue_depth.set(self.queue.qsize())
            try:
                outcomes = await loop.run_in_executor(self.worker, self._run, batch)
            except Exception as e:  # a failed batch fails its requests, never the worker
                outcomes = [e] * len(batch)
            for j, outcome in zip(batch, outcomes):
                if j.future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    j.future.set_exception(outcome)
                else:
                    j.future.set_result(outcome)

    def _run(self, batch: list[Job]) -> list[Done]:
        start = time.perf_counter()
        groups: dict[tuple[str, str], list[int]] = {}
        for i, j in enumerate(batch):
            groups.setdefault((j.category, j.mode), []).append(i)
        results: list[InspectionResult | None] = [None] * len(batch)
        for (category, mode), idx in groups.items():
            out = self.inspector.inspect_loaded([batch[i].loaded for i in idx], category, mode)
            for i, r in zip(idx, out):
                results[i] = r
        inference_s = time.perf_counter() - start
        self.metrics.inference.observe(inference_s)
        self.metrics.batch_size.observe(len(batch))
        self.per_image_s = 0.8 * self.per_image_s + 0.2 * inference_s / len(batch)
        if self.journal is not None:
            bundle, precision = self.inspector.bundle.identity, self.inspector.precision
            self.journal.record(
                Entry.of(r, "http", j.image_id, j.category, bundle, precision,
                         self.inspector.thresholds(j.category, r.mode or "").get("image"))
                for j, r in zip(batch, results))
        return [Done(r, len(batch), start - j.enqueued, inference_s)
                for j, r in zip(batch, results)]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length", "")
    too_big = HTTPError(413, "body_too_large", f"request body over the limit of {limit} bytes; "
                        "send a smaller image or raise --max-body-mb")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def image_and_fields(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """(image bytes, form fields): multipart with an ``image`` part, or the raw body."""
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype != "multipart/form-data":
        if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise HTTPError(415, "unsupported_media_type",
                            f"content type {ctype!r} is not accepted: send the image file as the "
                            "body (image/* or application/octet-stream) or as multipart/form-data "
                            "with an 'image' part")
        return body, {}

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8,
                                                           max_part_size=64 * 1024)
    except Exception as e:  # starlette raises its own HTTPException or MultiPartException
        raise HTTPError(400, "bad_multipart", f"the multipart body cannot be parsed: "
                        f"{getattr(e, 'detail', None) or e}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "missing_image", "the multipart body has no file part named "
                            "'image'")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
    return data, fields


def create_app(inspector: Inspector, config: ServeConfig | None = None) -> Starlette:
    config = config or ServeConfig()
    if config.max_batch < 1 or config.max_queue < 1 or config.max_body_bytes < 1:
        raise UsageError("max batch, max queue and max body size must be >= 1")
    metrics = Metrics(config.max_batch)
    journal = Journal(config.journal) if config.journal else None
    state = {"ready": False, "batcher": None}
    bundle = inspector.bundle
    identity = {"identity": bundle.identity, "precision": inspector.precision,
                "model": bundle.manifest.model.name,
                "weights": bundle.manifest.model.weights.kind}

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER)
        if given is None:
            raise HTTPError(401, "missing_api_key", f"this server requires an API key in the "
                            f"{API_KEY_HEADER} header")
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPError(401, "wrong_api_key", f"the {API_KEY_HEADER} header does not match "
                            "the server's API key")

    def endpoint(name: str, auth: bool = False):
        def wrap(handler):
            async def run(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    if auth:
                        authorize(request)
                    response = await handler(request)
                except HTTPError as e:
                    metrics.errors.labels(e.code).inc()
                    response = error_response(e)
                metrics.requests.labels(name, str(response.status_code)).inc()
                metrics.latency.labels(name).observe(time.perf_counter() - t0)
                return response
            return run
        return wrap

    @endpoint("inspect", auth=True)
    async def inspect(request: Request) -> Response:
        batcher: Batcher | None = state["batcher"]
        if not state["ready"] or batcher is None:
            raise HTTPError(503, "not_ready", "the model is loading or the server is shutting "
                            "down; retry shortly", {"Retry-After": "1"})
        t0 = time.perf_counter()
        data, fields = await image_and_fields(request, config.max_body_bytes)
        q = request.query_params
        category = fields.get("category") or q.get("category")
        mode = fields.get("mode") or q.get("mode") or "auto"
        heatmap = (fields.get("heatmap") or q.get("heatmap") or "false").lower()
        if heatmap not in ("true", "false", "1", "0"):
            raise HTTPError(422, "bad_parameter", f"heatmap={heatmap!r}: use true or false")
        if not category:
            raise HTTPError(422, "missing_category", "give the product category: ?category=NAME "
                            f"(this bundle has: {', '.join(bundle.categories)})")
        if mode not in MODES:
            raise HTTPError(422, "bad_parameter", f"mode={mode!r}: use one of {', '.join(MODES)}")
        if category not in bundle.manifest.categories:
            raise HTTPError(422, "unknown_category", f"unknown category {category!r}; this "
                            f"bundle has: {', '.join(bundle.categories)}")
        try:
            mode_used = inspector.check(category, mode)
        except ClipInspectError as e:
            raise HTTPError(422, "bad_parameter", str(e)) from None
        if not data:
            raise HTTPError(400, "empty_body", "the request carries no image bytes")
        want_map = heatmap in ("true", "1")
        loaded = await run_in_threadpool(inspector.load, EncodedImage(data), want_map)
        if loaded.error:
            raise HTTPError(400, "bad_image", loaded.error)
        decoded = time.perf_counter()
        image_id = uuid.uuid4().hex
        job = Job(loaded, category, mode, image_id, asyncio.get_running_loop().create_future())
        batcher.submit(job)
        try:
            done: Done = await job.future
        except Exception as e:  # the worker survived; this request cannot be answered
            raise HTTPError(500, "inference_failed", f"{type(e).__name__}: {e}") from None
        r = done.result
        if not r.ok:  # unreachable for a decoded image unless inference itself failed
            raise HTTPError(500, "inference_failed", r.error or "inference failed")
        thresholds = inspector.thresholds(category, mode_used)
        body = {
            "image_id": image_id, "category": category, "mode": r.mode,
            "image_score": r.image_score, "is_anomalous": r.is_anomalous,
            "threshold": ({"image": thresholds["image"],
                           "key": f"{inspector.precision}/{mode_used}"}
                          if "image" in thresholds else None),
            "bundle": identity, "batch_size": done.batch_size,
            "timings_ms": {"decode": 1e3 * (decoded - t0), "queue": 1e3 * done.queue_s,
                           "inference": 1e3 * done.inference_s,
                           "total": 1e3 * (time.perf_counter() - t0)},
        }
        if want_map:
            body["heatmap_png"] = await run_in_threadpool(heatmap_png, r, thresholds)
        return JSONResponse(body)

    @endpoint("healthz")
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @endpoint("readyz")
    async def readyz(request: Request) -> Response:
        if not state["ready"]:
            raise HTTPError(503, "not_ready", "loading, warming up or shutting down",
                            {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "bundle": identity,
                             "categories": bundle.categories})

    @endpoint("metrics", auth=True)
    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), headers={
            "Content-Type": CONTENT_TYPE_LATEST})

    @endpoint("openapi")
    async def openapi_endpoint(request: Request) -> Response:
        return JSONResponse(openapi_schema(bundle.categories, config))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Warm up on the worker thread: every category's data is loaded once, and the first
        # (slow) session run happens before readiness is reported.
        batcher = Batcher(inspector, config, metrics, journal)
        probe = inspector.load(np.full((64, 64, 3), 128, np.uint8))
        await asyncio.get_running_loop().run_in_executor(batcher.worker, warm_up, inspector,
                                                         probe)
        batcher.start()
        state["batcher"] = batcher
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()
            if journal is not None:
                journal.close()

    app = Starlette(routes=[
        Route("/v1/inspect", inspect, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.metrics = metrics
    return app


def warm_up(inspector: Inspector, probe: LoadedImage) -> None:
    for category in inspector.bundle.categories:
        inspector.inspect_loaded([probe], category, inspector.check(category))


def heatmap_png(result: InspectionResult, thresholds: dict) -> str:
    """Base64 PNG of the heat map over the image (colours as in ``predict``)."""
    amap = result.anomaly_map
    lo, hi = colour_range(thresholds, amap)
    buf = io.BytesIO()
    Image.fromarray(overlay(result.image, amap, vmin=lo, vmax=hi, mask=result.mask)).save(
        buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _error_schema() -> dict:
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["status", "code", "message"],
        "properties": {"status": {"type": "integer"}, "code": {"type": "string"},
                       "message": {"type": "string"}}}}}


def openapi_schema(categories: list[str], config: ServeConfig) -> dict:
    def error(description: str) -> dict:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    binary = {"type": "string", "format": "binary"}
    number_or_null = {"type": ["number", "null"]}
    security = [{"apiKey": []}] if config.api_key else []
    errors = {"400": error("the body is not a usable image (not an image, truncated, empty)"),
              "413": error(f"body over {config.max_body_bytes} bytes"),
              "415": error("unsupported content type"),
              "422": error("unknown category, bad mode or parameter"),
              "503": error("queue full or not ready; see Retry-After")}
    auth_errors = {"401": error("API key missing or wrong")} if config.api_key else {}
    return {
        "openapi": "3.1.0",
        "info": {"title": "clipinspect inspection service", "version": "1"},
        "paths": {
            "/v1/inspect": {"post": {
                "summary": "Inspect one image",
                "security": security,
                "parameters": [
                    {"name": "category", "in": "query", "required": True,
                     "description": "product category; one of " + ", ".join(categories)
                                    + " (a multipart 'category' field takes precedence)",
                     "schema": {"type": "string", "enum": categories}},
                    {"name": "mode", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": list(MODES)}},
                    {"name": "heatmap", "in": "query", "required": False,
                     "schema": {"type": "boolean"}},
                ],
                "requestBody": {"required": True, "content": {
                    "application/octet-stream": {"schema": binary},
                    "image/png": {"schema": binary},
                    "image/jpeg": {"schema": binary},
                    "multipart/form-data": {"schema": {
                        "type": "object", "required": ["image"],
                        "properties": {"image": binary,
                                       "category": {"type": "string", "enum": categories},
                                       "mode": {"type": "string", "enum": list(MODES)}}}},
                }},
                "responses": {"200": {"description": "the verdict", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Result"}}}},
                    **errors, **auth_errors},
            }},
            "/healthz": {"get": {"summary": "the process is up", "responses": {
                "200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "the model is loaded and warmed up", "responses": {
                "200": {"description": "ready"}, "503": error("not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": security,
                                 "responses": {"200": {"description": "text exposition format",
                                                       "content": {"text/plain": {}}},
                                               **auth_errors}}},
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header",
                                           "name": API_KEY_HEADER}},
            "schemas": {"Error": _error_schema(), "Result": {
                "type": "object",
                "required": ["image_id", "category", "mode", "image_score", "is_anomalous",
                             "threshold", "bundle", "batch_size", "timings_ms"],
                "properties": {
                    "image_id": {"type": "string"}, "category": {"type": "string"},
                    "mode": {"type": "string", "enum": ["zero-shot", "few-shot"]},
                    "image_score": {"type": "number"},
                    "is_anomalous": {"type": ["boolean", "null"],
                                     "description": "null when no threshold is set"},
                    "threshold": {"type": ["object", "null"], "properties": {
                        "image": {"type": "number"}, "key": {"type": "string"}}},
                    "bundle": {"type": "object"},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "timings_ms": {"type": "object", "properties": {
                        k: number_or_null for k in ("decode", "queue", "inference", "total")}},
                    "heatmap_png": {"type": "string", "description": "base64 PNG overlay"},
                }}},
        },
    }


def serve(bundle: str, host: str, port: int, config: ServeConfig, precision: str = "fp32",
          provider: str = "cpu", threads: int | None = None) -> None:
    import uvicorn

    auth_line = check_exposure(host, config.api_key)
    inspector = Inspector.open(bundle, precision, provider, threads)
    print(f"clipinspect serve: {inspector.bundle.identity} ({precision}, {provider}) on "
          f"http://{host}:{port}; {auth_line}; max batch {config.max_batch}, max wait "
          f"{config.max_wait_ms:g} ms, queue {config.max_queue}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(inspector, config), host=host, port=port, log_level="info",
                access_log=False)

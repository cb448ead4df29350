"""``clipinspect serve``: an HTTP inspection service (Starlette on uvicorn; the ``serve`` extra).

A request is admitted before its body is read: at most ``max_queue + max_batch`` requests are in
progress (reading, decoding, queued or inferring) and the next gets 503 with Retry-After at once,
so a full server holds no more request bytes. Admitted requests are decoded and preprocessed by at
most ``decode_workers`` threads at a time, then queued. One inference
worker owns the onnxruntime session: it takes whatever is queued, up to ``max_batch`` (waiting at
most ``max_wait_ms`` for more when the queue runs dry), encodes it in one pass whatever the
categories (the encoder does not depend on them), scores each (category, mode) group with its
head, and answers each request. Batch composition does not change a score: each image's score
depends on that image alone, and the tests check it against single-image inspection. Bodies over
the size limit get 413, bodies slower than ``body_timeout_s`` 408. Maps are computed at most
``max_map_side`` pixels on the longest side. See docs/security.md for every limit.
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
from typing import Callable

import anyio
import anyio.to_thread
import numpy as np
from PIL import Image
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.errors import ClipInspectError, UsageError
from ..core.images import EncodedImage
from ..core.inspector import InspectionResult, Inspector, LoadedImage
from ..core.names import (INFERENCE, LOAD, MODES, OLD_LOAD_TIMING, QUEUE, REQUEST_TIMINGS,
                          SCORING_MODES, TOTAL)
from .journal import Entry, Journal, JournalUnavailable
from .ui import LiveFeed, ui_routes
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
    # Memory and connection bounds for untrusted clients (docs/security.md).
    max_map_side: int = 1024      # longest side of the computed map and the returned heat map
    decode_workers: int = 2       # requests decoded at once (each may hold a full-size image)
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408
    max_connections: int = 256    # open connections; beyond, the oldest idle one is closed
    max_connections_per_client: int = 32  # open connections of one client address; 503 beyond
    header_timeout_s: float = 5.0  # a request head must be complete this long after connecting
    # /readyz turns 503 when the worker has made no progress for this long with work waiting.
    inference_timeout_s: float = 60.0
    # True: a micro-batch mixing categories (or modes) is encoded in one pass and split at the
    # scoring heads. False: one encoder pass per (category, mode) group, as before; kept so that
    # benchmarks/mixed_categories.py measures both in one run.
    one_encoder_pass: bool = True


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
        self.connections_closed = Counter(
            "clipinspect_connections_closed", "Connections closed or refused by the server's "
            "connection limits, by reason", ["reason"], registry=r)


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
        # The watchdog's clock: the worker is idle (waiting for a request), or it last made
        # progress (started or finished a batch) at progress_at (event-loop time).
        self.idle = True
        self.progress_at = 0.0

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
            self.idle = True
            job = await self.queue.get()
            self.idle, self.progress_at = False, loop.time()
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
            self.progress_at = loop.time()
            try:
                outcomes = await loop.run_in_executor(self.worker, self._run, batch)
            except Exception as e:  # a failed batch fails its requests, never the worker
                outcomes = [e] * len(batch)
            self.progress_at = loop.time()
            for j, outcome in zip(batch, outcomes):
                if j.future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    j.future.set_exception(outcome)
                else:
                    j.future.set_result(outcome)

    def stalled(self) -> str | None:
        """Why readiness is withdrawn (the worker made no progress for ``inference_timeout_s``
        with a batch in flight or requests queued), or None."""
        if self.task is not None and self.task.done():
            return "the inference worker has stopped; restart the service"
        if self.idle or self.task is None:
            return None
        quiet = asyncio.get_running_loop().time() - self.progress_at
        if quiet <= self.config.inference_timeout_s:
            return None
        return (f"inference has made no progress for {quiet:.0f} s (--inference-timeout "
                f"{self.config.inference_timeout_s:g} s) with a batch in flight and "
                f"{self.queue.qsize()} request(s) queued; the backend may be hung")

    def _run(self, batch: list[Job]) -> list[Done | HTTPError]:
        start = time.perf_counter()
        if self.config.one_encoder_pass:
            results = self.inspector.inspect_mixed([j.loaded for j in batch],
                                                   [(j.category, j.mode) for j in batch])
        else:
            results = [None] * len(batch)
            groups: dict[tuple[str, str], list[int]] = {}
            for i, j in enumerate(batch):
                groups.setdefault((j.category, j.mode), []).append(i)
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
            try:
                # Never waits long nor raises while the journal is locked or its disk full:
                # the entries stay pending and are written later (journal.py).
                self.journal.submit([
                    Entry.of(r, "http", j.image_id, j.category, bundle=bundle,
                             precision=precision, threshold=self.inspector.thresholds(
                                 j.category, r.mode or "").get("image"))
                    for j, r in zip(batch, results)])
            except JournalUnavailable as e:  # no room left to keep these results
                error = HTTPError(503, "journal_unavailable", f"the result could not be "
                                  f"journaled, so it is not given: {e}", {"Retry-After": "5"})
                return [error] * len(batch)
        return [Done(r, len(batch), start - j.enqueued, inference_s)
                for j, r in zip(batch, results)]


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit``, and with 408 if
    it has not all arrived within ``timeout_s`` (a client trickling bytes holds no slot)."""
    declared = request.headers.get("content-length", "")
    too_big = HTTPError(413, "body_too_large", f"request body over the limit of {limit} bytes; "
                        "send a smaller image or raise --max-body-mb")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPError(408, "body_timeout", f"the request body did not arrive within "
                        f"{timeout_s:g} s ({size} bytes received); send it at once") from None
    return b"".join(chunks)


async def image_and_fields(request: Request, config: ServeConfig) -> tuple[bytes, dict[str, str]]:
    """(image bytes, form fields): multipart with an ``image`` part, or the raw body."""
    body = await read_body(request, config.max_body_bytes, config.body_timeout_s)
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


class Service:
    """The application's state and handlers; :func:`create_app` wires them into Starlette.

    ``source`` is an Inspector, or a function that opens one: then the port can be bound first
    and /readyz answers 503 while the model loads and warms up."""

    def __init__(self, source: Inspector | Callable[[], Inspector], config: ServeConfig,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.source, self.config, self.on_load_error = source, config, on_load_error
        self.metrics = Metrics(config.max_batch)
        self.journal = Journal(config.journal) if config.journal else None
        self.feed = LiveFeed()
        self.inspector: Inspector | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.identity: dict = {}
        # Requests past admission (reading, decoding, queued or inferring); counted before the
        # body is read, so a full server refuses without holding any request's bytes.
        self.admitted = 0
        self.capacity = config.max_queue + config.max_batch
        self.decoders = anyio.CapacityLimiter(config.decode_workers)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load (when given a loader), warm up on the worker thread, then report ready."""
        try:
            inspector = self.source
            if not isinstance(inspector, Inspector):
                inspector = await anyio.to_thread.run_sync(self.source)
            bundle = inspector.bundle
            self.identity = {"identity": bundle.identity, "precision": inspector.precision,
                             "model": bundle.manifest.model.name,
                             "weights": bundle.manifest.model.weights.kind}
            batcher = Batcher(inspector, self.config, self.metrics, self.journal)
            # Every category's data is loaded once, and the first (slow) session run happens
            # before readiness is reported.
            probe = inspector.load(np.full((64, 64, 3), 128, np.uint8))
            await asyncio.get_running_loop().run_in_executor(batcher.worker, warm_up,
                                                             inspector, probe)
        except BaseException as e:
            if self.on_load_error is None or not isinstance(e, Exception):
                raise
            self.on_load_error(e)
            return
        batcher.start()
        self.inspector, self.batcher, self.ready = inspector, batcher, True

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        starting = asyncio.get_running_loop().create_task(self.start())
        if isinstance(self.source, Inspector):
            await starting  # already loaded: ready before the first request, as before
        try:
            yield
        finally:
            self.ready = False
            with contextlib.suppress(Exception):
                await starting
            if self.batcher is not None:
                await self.batcher.stop()
            if self.journal is not None:
                self.journal.close()

    # ------------------------------------------------------------- plumbing
    def authorized(self, request: Request) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        given = request.headers.get(API_KEY_HEADER)
        # Header values arrive as latin-1; the key is ASCII (checked at start), compare bytes.
        return given is not None and hmac.compare_digest(given.encode("latin-1"), key.encode())

    def authorize(self, request: Request) -> None:
        if self.authorized(request):
            return
        if request.headers.get(API_KEY_HEADER) is None:
            raise HTTPError(401, "missing_api_key", f"this server requires an API key in the "
                            f"{API_KEY_HEADER} header")
        raise HTTPError(401, "wrong_api_key", f"the {API_KEY_HEADER} header does not match the "
                        "server's API key")

    def endpoint(self, name: str, handler, auth: bool = False):
        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                if auth:
                    self.authorize(request)
                response = await handler(request)
            except HTTPError as e:
                self.metrics.errors.labels(e.code).inc()
                response = error_response(e)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return response
        return run

    def admit(self) -> Batcher:
        if not self.ready or self.batcher is None:
            raise HTTPError(503, "not_ready", "the model is loading or the server is shutting "
                            "down; retry shortly", {"Retry-After": "1"})
        if self.admitted >= self.capacity:
            self.metrics.rejected.inc()
            wait = max(1, math.ceil(self.admitted * self.batcher.per_image_s))
            raise HTTPError(503, "queue_full", f"the server is at capacity ({self.capacity} "
                            f"requests in progress); retry after {wait} s",
                            {"Retry-After": str(wait)})
        return self.batcher

    # ------------------------------------------------------------- handlers
    async def inspect(self, request: Request) -> Response:
        batcher = self.admit()
        self.admitted += 1
        try:
            return await self._inspect(request, batcher)
        finally:
            self.admitted -= 1

    async def _inspect(self, request: Request, batcher: Batcher) -> Response:
        t0 = time.perf_counter()
        data, fields = await image_and_fields(request, self.config)
        category, mode, mode_used, want_map = self._parameters(request, fields)
        if not data:
            raise HTTPError(400, "empty_body", "the request carries no image bytes")
        async with self.decoders:  # at most decode_workers full-size images in memory
            loaded = await anyio.to_thread.run_sync(self._load, data,
                                                    want_map or self.feed.wants_images)
        del data
        if loaded.error:
            raise HTTPError(400, "bad_image", loaded.error)
        decoded = time.perf_counter()
        job = Job(loaded, category, mode, uuid.uuid4().hex,
                  asyncio.get_running_loop().create_future())
        batcher.submit(job)
        try:
            done: Done = await job.future
        except HTTPError:
            raise
        except Exception as e:  # the worker survived; this request cannot be answered
            raise HTTPError(500, "inference_failed", f"{type(e).__name__}: {e}") from None
        r = done.result
        if not r.ok:  # unreachable for a decoded image unless inference itself failed
            raise HTTPError(500, "inference_failed", r.error or "inference failed")
        thresholds = self.inspector.thresholds(category, mode_used)
        body = {
            "image_id": job.image_id, "category": category, "mode": r.mode,
            "image_score": r.image_score, "is_anomalous": r.is_anomalous,
            "threshold": ({"image": thresholds["image"],
                           "key": f"{self.inspector.precision}/{mode_used}"}
                          if "image" in thresholds else None),
            "bundle": self.identity, "batch_size": done.batch_size,
            "timings_ms": {LOAD: 1e3 * (decoded - t0), QUEUE: 1e3 * done.queue_s,
                           INFERENCE: 1e3 * done.inference_s,
                           TOTAL: 1e3 * (time.perf_counter() - t0)},
        }
        body["timings_ms"][OLD_LOAD_TIMING] = body["timings_ms"][LOAD]
        if want_map:
            body["heatmap_png"] = await anyio.to_thread.run_sync(heatmap_png, r, thresholds)
        # The live page's record (its thumbnail) is made after the answer has been sent.
        return JSONResponse(body, background=BackgroundTask(
            self.feed.record, category, r, thresholds, time.perf_counter() - t0))

    def _parameters(self, request: Request, fields: dict) -> tuple[str, str, str, bool]:
        """(category, mode, mode used, heat map wanted) from the form fields or the query."""
        q = request.query_params
        category = fields.get("category") or q.get("category")
        mode = fields.get("mode") or q.get("mode") or "auto"
        heatmap = (fields.get("heatmap") or q.get("heatmap") or "false").lower()
        categories = self.inspector.bundle.categories
        if heatmap not in ("true", "false", "1", "0"):
            raise HTTPError(422, "bad_parameter", f"heatmap={heatmap!r}: use true or false")
        if not category:
            raise HTTPError(422, "missing_category", "give the product category: ?category=NAME "
                            f"(this bundle has: {', '.join(categories)})")
        if mode not in MODES:
            raise HTTPError(422, "bad_parameter", f"mode={mode!r}: use one of {', '.join(MODES)}")
        if category not in self.inspector.bundle.manifest.categories:
            raise HTTPError(422, "unknown_category", f"unknown category {category!r}; this "
                            f"bundle has: {', '.join(categories)}")
        try:
            mode_used = self.inspector.check(category, mode)
        except ClipInspectError as e:
            # Clients see the bundle by identity, never by its path on the server.
            message = str(e).replace(str(self.inspector.bundle.root), "BUNDLE")
            raise HTTPError(422, "bad_parameter", message) from None
        return category, mode, mode_used, heatmap in ("true", "1")

    def _load(self, data: bytes, want_map: bool) -> LoadedImage:
        """Decode and preprocess (a worker thread); the map is computed, and the image kept, at
        most ``max_map_side`` pixels on the longest side."""
        loaded = self.inspector.load(EncodedImage(data), want_map)
        if loaded.error is None:
            h, w = loaded.size
            scale = self.config.max_map_side / max(h, w)
            if scale < 1:
                loaded.size = (max(1, round(h * scale)), max(1, round(w * scale)))
                if loaded.image is not None:
                    loaded.image = np.asarray(Image.fromarray(loaded.image).resize(
                        (loaded.size[1], loaded.size[0]), Image.Resampling.BILINEAR))
        return loaded

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready:
            raise HTTPError(503, "not_ready", "loading, warming up or shutting down",
                            {"Retry-After": "1"})
        stalled = self.batcher.stalled()
        if stalled:
            raise HTTPError(503, "inference_stalled", stalled, {"Retry-After": "5"})
        if self.journal is not None:
            writable, reason = self.journal.health()
            if not writable:
                if not self.authorized(request):  # the reason names server paths
                    reason = "the results journal cannot be written (the reason: with the key)"
                raise HTTPError(503, "journal_unavailable", f"{reason}; {self.journal.pending} "
                                "result(s) pending, retried", {"Retry-After": "5"})
        if not self.authorized(request):  # with a key set, what is served is not public
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "ready", "bundle": self.identity,
                             "categories": self.inspector.bundle.categories})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi_endpoint(self, request: Request) -> Response:
        if not self.ready:
            raise HTTPError(503, "not_ready", "loading, warming up or shutting down",
                            {"Retry-After": "1"})
        return JSONResponse(openapi_schema(self.inspector.bundle.categories, self.config))


def check_config(config: ServeConfig) -> None:
    if min(config.max_batch, config.max_queue, config.max_body_bytes, config.decode_workers,
           config.max_map_side, config.max_connections, config.max_connections_per_client) < 1:
        raise UsageError("max batch, max queue, max body size, decode workers, max map side, "
                         "max connections and max connections per client must be >= 1")
    for name, seconds in (("--body-timeout", config.body_timeout_s),
                          ("--header-timeout", config.header_timeout_s),
                          ("--inference-timeout", config.inference_timeout_s)):
        if not (seconds > 0 and math.isfinite(seconds)):
            raise UsageError(f"{name} {seconds!r}: give a positive number of seconds")
    key = config.api_key
    if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key):
        # Header values are latin-1 on the wire; a key outside printable ASCII could never match.
        raise UsageError("the API key must be printable ASCII without surrounding spaces; "
                         "generate one with: python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'")


def create_app(source: Inspector | Callable[[], Inspector], config: ServeConfig | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> Starlette:
    """The service of an Inspector, or of a function that opens one (loaded after the port is
    bound; ``on_load_error`` is told if that fails)."""
    config = config or ServeConfig()
    check_config(config)
    s = Service(source, config, on_load_error)
    app = Starlette(routes=[
        Route("/v1/inspect", s.endpoint("inspect", s.inspect, auth=True), methods=["POST"]),
        Route("/healthz", s.endpoint("healthz", s.healthz), methods=["GET"]),
        Route("/readyz", s.endpoint("readyz", s.readyz), methods=["GET"]),
        Route("/metrics", s.endpoint("metrics", s.metrics_endpoint, auth=True), methods=["GET"]),
        Route("/openapi.json", s.endpoint("openapi", s.openapi_endpoint, auth=True),
              methods=["GET"]),
        *ui_routes(s.feed, s.endpoint),
    ], lifespan=s.lifespan)
    app.state.metrics = s.metrics
    app.state.service = s
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
                    "mode": {"type": "string", "enum": list(SCORING_MODES)},
                    "image_score": {"type": "number"},
                    "is_anomalous": {"type": ["boolean", "null"],
                                     "description": "null when no threshold is set"},
                    "threshold": {"type": ["object", "null"], "properties": {
                        "image": {"type": "number"}, "key": {"type": "string"}}},
                    "bundle": {"type": "object"},
                    "batch_size": {"type": "integer", "minimum": 1},
                    "timings_ms": {"type": "object", "properties": {
                        k: number_or_null for k in (*REQUEST_TIMINGS, OLD_LOAD_TIMING)}},
                    "heatmap_png": {"type": "string", "description": "base64 PNG overlay"},
                }}},
        },
    }


def serve(bundle: str, host: str, port: int, config: ServeConfig, *, precision: str = "fp32",
          provider: str = "cpu", threads: int | None = None) -> None:
    """Bind first, then load the bundle: /readyz answers 503 until it is loaded and warm."""
    import uvicorn

    auth_line = check_exposure(host, config.api_key)
    check_config(config)
    failed: list[BaseException] = []

    def load() -> Inspector:
        inspector = Inspector.open(bundle, precision, provider, threads)
        print(f"clipinspect serve: loaded {inspector.bundle.identity}; warming up",
              file=sys.stderr, flush=True)
        return inspector

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    server = uvicorn.Server(uvicorn_config(create_app(load, config, load_failed), host, port,
                                           config))
    print(f"clipinspect serve: {bundle} ({precision}, {provider}) on http://{host}:{port}; "
          f"{auth_line}; max batch {config.max_batch}, max wait {config.max_wait_ms:g} ms, "
          f"queue {config.max_queue}", file=sys.stderr, flush=True)
    server.run()
    if failed:
        raise failed[0]


def uvicorn_config(app: Starlette, host: str, port: int, config: ServeConfig):
    """uvicorn's settings for ``app`` (from :func:`create_app`), with the connection limits of
    :mod:`.connections` in front of it (uvicorn's own ``limit_concurrency`` is off: it counted
    idle sockets too)."""
    import uvicorn

    from .connections import ConnectionGuard

    closed = app.state.metrics.connections_closed
    guard = ConnectionGuard(config.header_timeout_s, config.max_connections,
                            config.max_connections_per_client,
                            lambda reason: closed.labels(reason).inc())
    app.state.connections = guard
    # timeout_keep_alive: a keep-alive connection that sends nothing after a response is closed
    # after 5 s (one that trickles bytes meets the header deadline instead).
    return uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                          http=guard.protocol, limit_concurrency=None, timeout_keep_alive=5)

"""The service's state and its request handlers: admission, parameters, decoding, the answer
of /v1/inspect, readiness and the other routes (:func:`routes`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from typing import Callable

import anyio
import anyio.to_thread
import numpy as np
from PIL import Image
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ..core.errors import ClipInspectError
from ..core.images import EncodedImage
from ..core.inspector import Inspector, LoadedImage
from ..core.names import INFERENCE, LOAD, MODES, OLD_LOAD_TIMING, QUEUE, TOTAL
from .auth import authorize, authorized
from .batcher import Batcher, Done, Job
from .bodies import image_and_fields
from .config import ServeConfig
from .errors import HTTPError, error_response
from .heatmap import overlay_png
from .drift import DriftMonitor
from .drift_watch import DriftWatch
from .journal import Journal
from ..core.memory_book import FeedbackPolicy
from .metrics import Metrics
from .operations import Operations
from .shadow import Shadow
from .openapi import openapi_schema
from .ui import LiveFeed, ui_routes


class Service:
    """The application's state and handlers; :func:`routes` lists them, and
    :func:`.server.create_app` makes them a Starlette application.

    ``source`` is an Inspector, or a function that opens one: then the port can be bound first
    and /readyz answers 503 while the model loads and warms up."""

    def __init__(self, source: Inspector | Callable[[], Inspector], config: ServeConfig,
                 on_load_error: Callable[[BaseException], None] | None = None,
                 shadow: Inspector | Callable[[], Inspector] | None = None):
        self.source, self.config, self.on_load_error = source, config, on_load_error
        self.shadow_source = shadow
        self.on_ready: Callable[[], None] | None = None
        self.operations = Operations(self, FeedbackPolicy(config.threshold_policy,
                                                          config.memory_max),
                                     config.feedback_results, config.feedback_bytes)
        self.metrics = Metrics(config.max_batch)
        self.journal = Journal(config.journal) if config.journal else None
        self.feed = LiveFeed()
        self.drift = DriftWatch(self.metrics.registry, self.journal,
                                DriftMonitor(config.drift_reference, config.drift_window))
        self.feed.providers["drift"] = self.drift.state
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
            inspector = await opened(self.source)
            self.use(inspector)
            shadow = None
            if self.shadow_source is not None:
                shadow = Shadow(check_shadow(inspector, await opened(self.shadow_source)),
                                self.config.shadow_backlog)
            batcher = Batcher(inspector, self.config, self.metrics, self.journal, shadow)
            if shadow is not None:
                self.metrics.watch_shadow(shadow)
                self.feed.providers["shadow"] = shadow.state
            # Every category's data is loaded once, and the first (slow) session run happens
            # before readiness is reported.
            probe = inspector.load(np.full((64, 64, 3), 128, np.uint8))
            await asyncio.get_running_loop().run_in_executor(batcher.worker, warm_up,
                                                             inspector, probe)
            if shadow is not None:
                await asyncio.get_running_loop().run_in_executor(shadow.worker, warm_up,
                                                                 shadow.inspector, probe)
        except BaseException as e:
            if self.on_load_error is None or not isinstance(e, Exception):
                raise
            self.on_load_error(e)
            return
        batcher.start()
        self.inspector, self.batcher, self.ready = inspector, batcher, True
        if self.on_ready is not None:
            self.on_ready()

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
                if self.batcher.shadow is not None:
                    self.batcher.shadow.close()
            if self.journal is not None:
                self.journal.close()

    def use(self, inspector: Inspector) -> None:
        """Serve with ``inspector`` from now on (at start, and on promote or rollback)."""
        bundle = inspector.bundle
        self.inspector = inspector
        self.identity = {"identity": bundle.identity, "precision": inspector.precision,
                         "model": bundle.manifest.model.name,
                         "weights": bundle.manifest.model.weights.kind}
        self.feed.bundle = dict(self.identity)

    # ------------------------------------------------------------- plumbing
    def authorized(self, request: Request) -> bool:
        return authorized(request, self.config.api_key)

    def endpoint(self, name: str, handler, auth: bool = False):
        async def run(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                if auth:
                    authorize(request, self.config.api_key)
                response = await handler(request)
            except HTTPError as e:
                self.metrics.errors.labels(e.code).inc()
                response = error_response(e)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return response
        return run

    def running(self) -> Batcher:
        """The batcher, once ready (operator routes: not counted against the capacity, so that
        a full queue cannot keep an operator from acting)."""
        if not self.ready or self.batcher is None:
            raise HTTPError(503, "not_ready", "the model is loading or the server is shutting "
                            "down; retry shortly", {"Retry-After": "1"})
        return self.batcher

    def admit(self) -> Batcher:
        self.running()
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
        thresholds = done.thresholds
        identity = (self.identity if done.identity == self.identity["identity"]
                    else {**self.identity, "identity": done.identity})
        body = {
            "image_id": job.image_id, "category": category, "mode": r.mode,
            "image_score": r.image_score, "is_anomalous": r.is_anomalous,
            "threshold": ({"image": thresholds["image"],
                           "key": f"{self.inspector.precision}/{mode_used}"}
                          if "image" in thresholds else None),
            "bundle": identity, "memory": done.memory, "batch_size": done.batch_size,
            "timings_ms": {LOAD: 1e3 * (decoded - t0), QUEUE: 1e3 * done.queue_s,
                           INFERENCE: 1e3 * done.inference_s,
                           TOTAL: 1e3 * (time.perf_counter() - t0)},
        }
        body["timings_ms"][OLD_LOAD_TIMING] = body["timings_ms"][LOAD]
        if want_map:
            body["heatmap_png"] = await anyio.to_thread.run_sync(overlay_png, r, thresholds)
        self.operations.recent.add(job.image_id, category, data, r)
        # The live page's record (its thumbnail) and the drift watch's update are made after
        # the answer has been sent.
        return JSONResponse(body, background=BackgroundTask(
            self._after, job, r, thresholds, time.perf_counter() - t0))

    def _after(self, job: Job, r, thresholds: dict, seconds: float) -> None:
        self.feed.record(job.category, r, thresholds, seconds, image_id=job.image_id)
        self.drift.observe(job.category, "http", job.loaded, r, self.inspector.bundle.preprocess)

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

    async def root(self, request: Request) -> Response:
        return RedirectResponse("/ui", status_code=307)

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
        return self.metrics.exposition()

    async def openapi_endpoint(self, request: Request) -> Response:
        if not self.ready:
            raise HTTPError(503, "not_ready", "loading, warming up or shutting down",
                            {"Retry-After": "1"})
        return JSONResponse(openapi_schema(self.inspector.bundle.categories, self.config))




async def opened(source: Inspector | Callable[[], Inspector]) -> Inspector:
    if isinstance(source, Inspector):
        return source
    return await anyio.to_thread.run_sync(source)


def check_shadow(active: Inspector, shadow: Inspector) -> Inspector:
    """A shadow must take every request the active bundle takes: the same categories."""
    missing = [c for c in active.bundle.categories if c not in shadow.bundle.categories]
    if missing:
        raise ClipInspectError(f"the shadow bundle {shadow.bundle.identity} lacks the "
                               f"categories {', '.join(missing)} of the active bundle; add "
                               "them or choose another candidate")
    return shadow


def warm_up(inspector: Inspector, probe: LoadedImage) -> None:
    for category in inspector.bundle.categories:
        inspector.inspect_loaded([probe], category, inspector.check(category))


def routes(s: Service) -> list[Route]:
    """Every route of the service, each wrapped by :meth:`Service.endpoint`."""
    return [
        Route("/v1/inspect", s.endpoint("inspect", s.inspect, auth=True), methods=["POST"]),
        Route("/healthz", s.endpoint("healthz", s.healthz), methods=["GET"]),
        Route("/readyz", s.endpoint("readyz", s.readyz), methods=["GET"]),
        Route("/metrics", s.endpoint("metrics", s.metrics_endpoint, auth=True), methods=["GET"]),
        Route("/openapi.json", s.endpoint("openapi", s.openapi_endpoint, auth=True),
              methods=["GET"]),
        Route("/", s.endpoint("root", s.root), methods=["GET"]),
        *s.operations.routes(s.endpoint),
        *ui_routes(s.feed, s.endpoint),
    ]

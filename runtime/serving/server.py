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

The parts, one module each: the settings (config.py), who may call (auth.py), the metrics
(metrics.py), the queue and the inference worker (batcher.py), reading bodies (bodies.py), the
handlers and routes (routes.py), the OpenAPI description (openapi.py), heat maps as PNG
(heatmap.py), error answers (errors.py), the connection limits (connections.py), the live page
(ui.py). This module puts them together and runs them on uvicorn.
"""

from __future__ import annotations

import sys
from typing import Callable

from starlette.applications import Starlette

from ..core.inspector import Inspector
from .auth import check_exposure
from .config import ServeConfig, check_config
from .routes import Service, routes

__all__ = ["ServeConfig", "create_app", "serve", "uvicorn_config"]


def create_app(source: Inspector | Callable[[], Inspector], config: ServeConfig | None = None,
               on_load_error: Callable[[BaseException], None] | None = None, *,
               shadow: Inspector | Callable[[], Inspector] | None = None,
               on_ready: Callable[[], None] | None = None) -> Starlette:
    """The service of an Inspector, or of a function that opens one (loaded after the port is
    bound; ``on_load_error`` is told if that fails); ``shadow``: a candidate bundle scoring the
    same traffic off the critical path (docs/operations.md)."""
    config = config or ServeConfig()
    check_config(config)
    s = Service(source, config, on_load_error, shadow)
    s.on_ready = on_ready
    app = Starlette(routes=routes(s), lifespan=s.lifespan)
    app.state.metrics = s.metrics
    app.state.service = s
    return app


def serve(bundle: str, host: str, port: int, config: ServeConfig, *, precision: str = "fp32",
          provider: str = "cpu", threads: int | None = None, attention: str = "auto",
          shadow: str | None = None) -> None:
    """Bind first, then load the bundle: /readyz answers 503 until it is loaded and warm."""
    import uvicorn

    auth_line = check_exposure(host, config.api_key)
    check_config(config)
    failed: list[BaseException] = []

    def opener(path: str, what: str) -> Callable[[], Inspector]:
        def load() -> Inspector:
            inspector = Inspector.open(path, precision, provider, threads, attention=attention)
            if what == "bundle":  # line mode: a MuSc pool learns from the parts judged normal
                inspector.stream()
            print(f"clipinspect serve: loaded {what} {inspector.bundle.identity} "
                  f"({inspector.encoder_graph}); warming up", file=sys.stderr, flush=True)
            if inspector.bundle.manifest.model.weights.kind == "random":
                print(f"clipinspect serve: WARNING: {what} {inspector.bundle.identity} has "
                      "RANDOM weights: its scores mean nothing for inspection",
                      file=sys.stderr, flush=True)
            return inspector
        return load

    def ready() -> None:
        print(f"clipinspect serve: ready on http://{host}:{port}; live page "
              f"http://{host}:{port}/ui", file=sys.stderr, flush=True)

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    app = create_app(opener(bundle, "bundle"), config, load_failed, on_ready=ready,
                     shadow=opener(shadow, "shadow bundle") if shadow else None)
    server = uvicorn.Server(uvicorn_config(app, host, port, config))
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

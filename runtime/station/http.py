"""The station's HTTP side (the serve extra): ``/healthz``, ``/readyz``, ``/metrics``, the live
page ``/ui`` as ``serve`` has it, and ``POST /v1/trigger`` when ``[trigger] kind = 'http'``.

Bound to loopback by default; any other address needs an API key (``CLIPINSPECT_API_KEY``),
which ``/metrics``, ``/ui/state.json`` and ``/v1/trigger`` then ask for, as with ``serve``.
uvicorn runs in a thread of its own, so the station's threads stay as they are.
"""

from __future__ import annotations

import os
import threading

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.errors import UsageError
from ..serving.auth import authorize, is_loopback
from ..serving.errors import HTTPError, error_response
from ..serving.ui import LiveFeed, ui_routes
from .station import Station


def create_app(station: Station, feed: LiveFeed, api_key: str | None,
               http_trigger: bool) -> Starlette:
    def endpoint(name, handler, auth: bool = False):
        async def run(request: Request) -> Response:
            try:
                if auth:
                    authorize(request, api_key)
                return await handler(request)
            except HTTPError as e:
                return error_response(e)
        return run

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not station.source_up or station.stopping.is_set():
            return JSONResponse({"status": "not_ready", "state": station.state}, 503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready"} | station.health())

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        station.refresh_metrics()
        return Response(station.metrics.exposition(),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def trigger(request: Request) -> Response:
        if station.stopping.is_set():
            raise HTTPError(503, "stopping", "the station is stopping", {"Retry-After": "1"})
        meas_id = (request.query_params.get("meas_id") or "")[:128]
        return JSONResponse({"part_id": station.trigger("http", meas_id)})

    routes = [Route("/healthz", endpoint("healthz", healthz)),
              Route("/readyz", endpoint("readyz", readyz)),
              Route("/metrics", endpoint("metrics", metrics, auth=True)),
              *ui_routes(feed, endpoint)]
    if http_trigger:
        routes.append(Route("/v1/trigger", endpoint("trigger", trigger, auth=True),
                            methods=["POST"]))
    return Starlette(routes=routes)


class HttpThread:
    """uvicorn serving the app in a daemon thread; ``port`` is the one bound (0: any)."""

    def __init__(self, app: Starlette, host: str, port: int):
        import uvicorn
        if not is_loopback(host) and not os.environ.get("CLIPINSPECT_API_KEY"):
            raise UsageError(f"[http] host = {host!r} is reachable from other machines: set an "
                             "API key in CLIPINSPECT_API_KEY, or bind 127.0.0.1")
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level="warning", access_log=False))
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="station-http",
                                        daemon=True)

    def start(self, timeout_s: float = 10.0) -> int:
        self._thread.start()
        for _ in range(int(timeout_s / 0.02)):
            if self.server.started:
                break
            self._thread.join(0.02)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        return sockets[0].getsockname()[1] if sockets else -1

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(5)

"""What an operator does to a running ``serve``: feedback on a result, the few-shot memory's log
and undo, the shadow bundle's agreement, promote and rollback (docs/operations.md).

Every route here needs the API key where one is set. A memory change and a swap of bundles run on
the inference worker's thread between two batches (``Batcher.between_batches``), so a batch is
scored with one memory and one bundle, never a mix.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.errors import ClipInspectError
from ..core.inspector import InspectionResult
from ..core.memory_book import FALSE_ALARM, LABELS, FeedbackPolicy, MemoryBook
from .errors import HTTPError

MAX_JSON_BYTES = 64 * 1024


@dataclass
class Recent:
    """What a click on a result needs later: the part's image file, as it was sent."""

    category: str
    data: bytes
    image_score: float | None
    verdict: str
    time: float


class RecentResults:
    """The last ``max_items`` results (their images at most ``max_bytes`` in all), by image id;
    the oldest leave first. A click needs no file on the client's side."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, Recent] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, image_id: str, category: str, data: bytes, result: InspectionResult) -> None:
        if self.max_items < 1 or len(data) > self.max_bytes:
            return
        verdict = {True: "NG", False: "OK"}.get(result.is_anomalous, "no threshold")
        with self._lock:
            self._items[image_id] = Recent(category, data, result.image_score, verdict,
                                           time.time())
            self._bytes += len(data)
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.data)

    def get(self, image_id: str) -> Recent | None:
        with self._lock:
            return self._items.get(image_id)


class Operations:
    """The operator routes of one Service (``service``: routes.Service)."""

    def __init__(self, service, policy: FeedbackPolicy, max_items: int, max_bytes: int):
        self.service = service
        self.policy = policy.check()
        self.recent = RecentResults(max_items, max_bytes)
        self.promoted = 0  # promotes not rolled back yet
        self._swap_lock = None  # an asyncio.Lock, made on first use (in the event loop)

    @property
    def book(self) -> MemoryBook:
        return MemoryBook(self.service.inspector.bundle.root)

    def event(self, kind: str, detail: dict) -> None:
        print(f"clipinspect serve: {kind}: {json.dumps(detail)}", flush=True)
        if self.service.journal is not None:
            self.service.journal.event(kind, detail)

    # ------------------------------------------------------------------ feedback
    async def feedback(self, request: Request) -> Response:
        batcher = self.service.running()
        body = await json_body(request)
        image_id, label = body.get("image_id"), body.get("label")
        if label not in LABELS:
            raise HTTPError(422, "bad_parameter", f"label={label!r}: use one of "
                            f"{', '.join(LABELS)}")
        recent = self.recent.get(str(image_id))
        if recent is None:
            raise HTTPError(404, "unknown_result", f"no recent result {image_id!r}: only the last "
                            f"{self.recent.max_items} results are kept for feedback; inspect the "
                            "part again, or give its image with 'clipinspect feedback'")
        who = operator(request, body)
        service = self.service

        def change() -> dict:
            inspector = service.inspector
            return self.book.feedback(inspector, recent.category, recent.data, label, who=who,
                                      result_id=str(image_id), score=recent.image_score,
                                      policy=self.policy)
        row = await self._memory_change(batcher, change)
        service.feed.mark(str(image_id), label, row)
        return JSONResponse(public(row, service.inspector.bundle.root))

    async def memory(self, request: Request) -> Response:
        self.service.running()
        category = self._category(request.query_params.get("category"))
        inspector = self.service.inspector
        book = self.book
        state = book.state(inspector, category)
        return JSONResponse({"category": category, **state,
                             "log": [public(r, inspector.bundle.root)
                                     for r in book.entries(category)]})

    async def undo(self, request: Request) -> Response:
        batcher = self.service.running()
        body = await json_body(request)
        category = self._category(body.get("category"))
        who = operator(request, body)
        row = await self._memory_change(
            batcher, lambda: self.book.undo(self.service.inspector, category, who=who))
        return JSONResponse(public(row, self.service.inspector.bundle.root))

    async def _memory_change(self, batcher, change) -> dict:
        try:
            row = await batcher.between_batches(change)
        except ClipInspectError as e:
            message = str(e).replace(str(self.service.inspector.bundle.root), "BUNDLE")
            raise HTTPError(409, "feedback_refused", message) from None
        self.event("memory", {k: row.get(k) for k in ("id", "action", "category", "who",
                                                       "result_id")}
                   | {"before": row["before"]["memory"], "after": row["after"]["memory"]})
        return row

    def _category(self, category) -> str:
        categories = self.service.inspector.bundle.categories
        if category not in categories:
            raise HTTPError(422, "unknown_category", f"category={category!r}: this bundle has "
                            f"{', '.join(categories)}")
        return category

    # ------------------------------------------------------------------ shadow
    async def shadow_state(self, request: Request) -> Response:
        shadow = self._shadow()
        return JSONResponse({"active": self.service.inspector.bundle.identity,
                             "promoted": self.promoted, **shadow.state()})

    async def promote(self, request: Request) -> Response:
        return await self._swap(request, "promote")

    async def rollback(self, request: Request) -> Response:
        if self.promoted < 1:
            raise HTTPError(409, "nothing_to_roll_back", "no promote to roll back: the active "
                            "bundle is the one serve started with")
        return await self._swap(request, "rollback")

    async def _swap(self, request: Request, kind: str) -> Response:
        import asyncio
        batcher, shadow = self.service.running(), self._shadow()
        body = await json_body(request)
        who = operator(request, body)
        if self._swap_lock is None:
            self._swap_lock = asyncio.Lock()
        async with self._swap_lock:
            before = self.service.inspector.bundle.identity
            state = shadow.state()

            def swap() -> None:
                promoted = shadow.swap(batcher.inspector)
                batcher.inspector = promoted
                self.service.use(promoted)
            await batcher.between_batches(swap)
            self.promoted += 1 if kind == "promote" else -1
            detail = {"who": who, "active_before": before,
                      "active": self.service.inspector.bundle.identity,
                      "shadow": shadow.inspector.bundle.identity,
                      "agreement_before": {k: state[k] for k in (
                          "scored", "verdict_agreement", "score_correlation", "dropped")}}
            self.event(kind, detail)
        return JSONResponse({"status": kind + "d" if kind == "promote" else "rolled back",
                             **detail})

    def _shadow(self):
        batcher = self.service.running()
        if batcher.shadow is None:
            raise HTTPError(409, "no_shadow", "this server runs no shadow bundle: start it with "
                            "'clipinspect serve BUNDLE --shadow CANDIDATE'")
        return batcher.shadow

    def routes(self, endpoint) -> list[Route]:
        return [
            Route("/v1/feedback", endpoint("feedback", self.feedback, auth=True),
                  methods=["POST"]),
            Route("/v1/memory", endpoint("memory", self.memory, auth=True), methods=["GET"]),
            Route("/v1/memory/undo", endpoint("memory_undo", self.undo, auth=True),
                  methods=["POST"]),
            Route("/v1/shadow", endpoint("shadow", self.shadow_state, auth=True),
                  methods=["GET"]),
            Route("/v1/admin/promote", endpoint("promote", self.promote, auth=True),
                  methods=["POST"]),
            Route("/v1/admin/rollback", endpoint("rollback", self.rollback, auth=True),
                  methods=["POST"]),
        ]


async def json_body(request: Request) -> dict:
    """A small JSON object body (empty: {}); at most MAX_JSON_BYTES."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON_BYTES:
            raise HTTPError(413, "body_too_large", f"a JSON body of at most {MAX_JSON_BYTES} "
                            "bytes is expected here")
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except ValueError:
        raise HTTPError(400, "bad_json", "the body is not JSON: send an object such as "
                        '{"image_id": "...", "label": "false_alarm"}') from None
    if not isinstance(body, dict):
        raise HTTPError(400, "bad_json", "the body must be a JSON object")
    return body


def operator(request: Request, body: dict) -> str:
    """Who acted: the body's ``who``, else the X-Operator header, else the client address."""
    who = body.get("who") or request.headers.get("x-operator")
    if not who:
        host = request.client.host if request.client else "unknown"
        who = f"client {host}"
    return str(who)[:100]


def public(row: dict, root) -> dict:
    """A journal line as a client sees it: no server path."""
    return json.loads(json.dumps(row).replace(str(root), "BUNDLE"))


__all__ = ["FALSE_ALARM", "Operations", "RecentResults"]

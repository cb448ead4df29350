"""The bounded queue and the one inference worker of ``clipinspect serve``.

The worker takes whatever is queued, up to ``max_batch`` (waiting at most ``max_wait_ms`` for more
when the queue runs dry), inspects it in one pass, journals the results and answers each job.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..core.inspector import InspectionResult, Inspector, LoadedImage
from .config import ServeConfig
from .errors import HTTPError
from .journal import Entry, Journal, JournalUnavailable
from .metrics import Metrics


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
    # What scored it: the thresholds applied, the bundle identity and the few-shot memory digest
    # (after a feedback swap or a promote, the next batch has new ones, never a mix).
    thresholds: dict = field(default_factory=dict)
    identity: str = ""
    memory: str | None = None


class Batcher:
    """The bounded queue and the one inference worker."""

    def __init__(self, inspector: Inspector, config: ServeConfig, metrics: Metrics,
                 journal: Journal | None, shadow=None):
        self.inspector, self.config, self.metrics, self.journal = (inspector, config, metrics,
                                                                   journal)
        self.shadow = shadow  # a .shadow.Shadow, offered every answered batch
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
        self.inspector.close_stream()  # a MuSc pool's additions not yet written

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
            if self.shadow is not None:  # after every answer: never on the critical path
                self.shadow.offer([(j.loaded, j.category, j.mode, j.image_id, o.result)
                                   for j, o in zip(batch, outcomes) if isinstance(o, Done)])

    async def between_batches(self, fn):
        """Run ``fn()`` on the inference worker's thread after the batch in flight (if any) and
        before the next one: what changes the memory or swaps the bundle goes through here."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn)

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
        inspector = self.inspector  # swapped only between batches (between_batches)
        inspector.refresh()  # feedback written by another process since the last batch
        if self.config.one_encoder_pass:
            results = inspector.inspect_mixed([j.loaded for j in batch],
                                                   [(j.category, j.mode) for j in batch])
        else:
            results = [None] * len(batch)
            groups: dict[tuple[str, str], list[int]] = {}
            for i, j in enumerate(batch):
                groups.setdefault((j.category, j.mode), []).append(i)
            for (category, mode), idx in groups.items():
                out = inspector.inspect_loaded([batch[i].loaded for i in idx], category, mode)
                for i, r in zip(idx, out):
                    results[i] = r
        inference_s = time.perf_counter() - start
        self.metrics.inference.observe(inference_s)
        self.metrics.batch_size.observe(len(batch))
        self.per_image_s = 0.8 * self.per_image_s + 0.2 * inference_s / len(batch)
        used = [inspector.thresholds(j.category, r.mode or "") for j, r in zip(batch, results)]
        if self.journal is not None:
            bundle, precision = inspector.bundle.identity, inspector.precision
            try:
                # Never waits long nor raises while the journal is locked or its disk full:
                # the entries stay pending and are written later (journal.py).
                self.journal.submit([
                    Entry.of(r, "http", j.image_id, j.category, bundle=bundle,
                             precision=precision, threshold=t.get("image"))
                    for j, r, t in zip(batch, results, used)])
            except JournalUnavailable as e:  # no room left to keep these results
                error = HTTPError(503, "journal_unavailable", f"the result could not be "
                                  f"journaled, so it is not given: {e}", {"Retry-After": "5"})
                return [error] * len(batch)
        identity = inspector.bundle.identity
        return [Done(r, len(batch), start - j.enqueued, inference_s, t, identity,
                     inspector.memory_digest(j.category))
                for j, r, t in zip(batch, results, used)]

"""The settings of ``clipinspect serve`` (:class:`ServeConfig`) and their check."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError
from ..core.memory_book import FeedbackPolicy
from .auth import check_api_key

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
    # benchmarks/experiments/mixed_categories.py measures both in one run.
    one_encoder_pass: bool = True
    # Operator feedback (docs/operations.md): the last results whose images are kept for a
    # click (count and bytes), the few-shot memory's largest size and the threshold policy.
    feedback_results: int = 64
    feedback_bytes: int = 256 * MiB
    memory_max: int = 32
    threshold_policy: str = "keep"
    # Drift watch (docs/drift.md): parts judged OK in the reference, parts in the recent window.
    drift_reference: int = 200
    drift_window: int = 100
    # Shadow bundle: batches waiting for it beyond this are dropped (counted).
    shadow_backlog: int = 2


def check_config(config: ServeConfig) -> None:
    if min(config.max_batch, config.max_queue, config.max_body_bytes, config.decode_workers,
           config.max_map_side, config.max_connections, config.max_connections_per_client,
           config.shadow_backlog) < 1:
        raise UsageError("max batch, max queue, max body size, decode workers, max map side, "
                         "max connections and max connections per client must be >= 1")
    for name, seconds in (("--body-timeout", config.body_timeout_s),
                          ("--header-timeout", config.header_timeout_s),
                          ("--inference-timeout", config.inference_timeout_s)):
        if not (seconds > 0 and math.isfinite(seconds)):
            raise UsageError(f"{name} {seconds!r}: give a positive number of seconds")
    check_api_key(config.api_key)
    if config.feedback_results < 0 or config.feedback_bytes < 0:
        raise UsageError("--feedback-results must be >= 0 (0: no feedback from the page)")
    FeedbackPolicy(config.threshold_policy, config.memory_max).check()
    if min(config.drift_reference, config.drift_window) < 5:
        raise UsageError(f"--drift-reference {config.drift_reference} / --drift-window "
                         f"{config.drift_window}: the drift test needs at least 5 parts in each")

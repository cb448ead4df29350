"""MuSc's streaming mode for a line: a rolling pool of the last K parts judged normal.

The pool is the category's few-shot memory (``memory_<output>`` of each part, features, not
images), so it starts from the normal parts ``clipinspect fewshot`` stored, persists in the
bundle's category data across restarts, and changes the way operator feedback changes a memory:
swapped in the Inspector between two batches, on the thread that inspects, then written with
``Bundle.set_memory`` so that other processes take it up (``Inspector.refresh``).

Rules (docs/methods.md#batch-mode-and-streaming-mode):
- only parts judged normal enter: their image score is below the category's image threshold for
  this precision and the few-shot (pool) mode. Without such a threshold nothing is judged and the
  pool does not change (warned once per category): set one with ``clipinspect threshold``;
- a part judged anomalous never enters; once the pool holds K parts the oldest leaves;
- the pool is written every ``save_every`` additions and when the line stops (``close``); a crash
  loses at most the additions since the last write, never the pool.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..core.inspector import InspectionResult, Inspector

#: Additions between two writes of the pool (each write is the whole pool file).
SAVE_EVERY = 20


class RollingPool:
    """The learner ``Inspector.stream`` installs for a MuSc bundle."""

    def __init__(self, inspector: "Inspector", save_every: int = SAVE_EVERY,
                 size: int | None = None, log=None):
        self.inspector = inspector
        self.size = int(size or inspector.manifest.section.pool_size)
        self.save_every = max(1, int(save_every))
        self.pending: dict[str, list[str]] = {}   # sources added since the last write
        self.mine: dict[str, object] = {}         # the category data this pool swapped in
        self.warned: set[str] = set()
        self.added = self.refused = self.lost = 0
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def judged(self, category: str, encoded: dict[str, np.ndarray], rows: Sequence[int],
               results: Sequence["InspectionResult"]) -> None:
        """After a batch scored against the pool: ``results[j]`` came from row ``rows[j]`` of
        the host ``encoded`` outputs. The normal ones join the pool."""
        if not results or not self._judging(category, results):
            return
        take = [rows[j] for j, r in enumerate(results) if r.is_anomalous is False]
        self.refused += sum(1 for r in results if r.is_anomalous)
        if not take:
            return
        data = self._current(category)
        per = {n: len(v) // max(data.shots, 1) for n, v in data.memory.items()}
        memory = {n: np.ascontiguousarray(np.concatenate(
            [v, encoded[n[len("memory_"):]][take].reshape(-1, v.shape[-1])])[-self.size * per[n]:])
            for n, v in data.memory.items()}
        self.pending[category] += [r.source for r in results if r.is_anomalous is False]
        self.inspector.swap_memory(category, memory, min(self.size, data.shots + len(take)))
        self.mine[category] = self.inspector.category_data(category)
        self.added += len(take)
        if len(self.pending[category]) >= self.save_every:
            self.save(category)

    def _judging(self, category: str, results: Sequence["InspectionResult"]) -> bool:
        if any(r.is_anomalous is not None for r in results):
            return True
        if category not in self.warned:
            self.warned.add(category)
            self.log(f"MuSc pool of {category!r} does not learn: no image threshold for "
                     f"{self.inspector.precision} few-shot, so no part is judged normal; set "
                     f"one with 'clipinspect threshold BUNDLE --category {category} "
                     "--normal DIR --mode few-shot'")
        return False

    def _current(self, category: str):
        """The pool as the Inspector scores with it. If something else replaced it since this
        pool's last change (feedback, undo, another process: Inspector.refresh), additions
        not yet written are gone with the old one: counted and said."""
        data = self.inspector.category_data(category)
        if category in self.mine and self.mine[category] is not data:
            if self.pending.get(category):
                self.lost += len(self.pending[category])
                self.log(f"MuSc pool of {category!r}: the memory was replaced meanwhile; "
                         f"{len(self.pending[category])} part(s) added since the last write "
                         "were dropped with the old pool")
            self.pending[category] = []
        self.pending.setdefault(category, [])
        return data

    def save(self, category: str) -> None:
        """Write the pool as the category's memory (sources: the parts, oldest first)."""
        data = self.inspector.category_data(category)
        entry = self.inspector.bundle.manifest.categories[category].memory
        base = list(entry.sources) if entry else []
        sources = (base + self.pending.get(category, []))[-data.shots:]
        self.inspector.bundle.set_memory(category, data.memory, sources, shots=data.shots)
        self.pending[category] = []

    def close(self) -> None:
        """Write every pool with additions not yet written."""
        for category, names in list(self.pending.items()):
            if names and self.mine.get(category) is self.inspector.category_data(category):
                self.save(category)

    def state(self) -> dict:
        return {"pool_size": self.size, "added": self.added, "refused": self.refused,
                "lost": self.lost,
                "unsaved": {c: len(v) for c, v in self.pending.items() if v}}

"""Operator feedback into a bundle's few-shot memory, journaled and undoable.

An operator marks a result:

- ``false_alarm`` (a good part flagged): its image joins the category's few-shot memory at once,
  as one more reference image, exactly as ``clipinspect fewshot`` would have encoded it. The
  memory is bounded (``max_shots``): when full, the oldest reference added by feedback leaves
  first; references given with ``fewshot`` never leave (a memory full of those refuses, with
  what to do). Thresholds follow the policy: ``keep`` them, or ``refit`` the category's few-shot
  thresholds of this precision from the normal images they were set on (recorded by ``clipinspect
  threshold --normal``) plus every reference added by feedback, at the same target rate.
- ``confirmed_defect`` (an NG that is one) and ``missed_defect`` (an OK that is not): the image is
  kept in the labelled set, ``feedback/labelled/<category>/test/{good,defect}`` (MVTec layout,
  image-level labels, no masks); false alarms are kept there as good parts too.

Every change is a line of ``feedback/log.jsonl`` in the bundle: who, when, which result, the
image kept, and the memory digest (sha256 of the memory file), shots and thresholds before and
after. Each memory version is also kept, byte for byte, in ``feedback/history``, so that
:meth:`MemoryBook.undo` restores the previous memory file exactly (same digest, same scores).
One lock file serialises changes of every process; a running ``serve``, ``watch`` or station
takes a change up between two batches (:meth:`..inspector.Inspector.refresh`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .bundle import atomic_write_bytes, read_manifest
from .manifest import category_folder
from .errors import ClipInspectError, UsageError, did_you_mean
from .images import EncodedImage, ImageError
from .names import FEW_SHOT
from .thresholds import NORMAL_RULE, from_normal_images

FOLDER = "feedback"
FALSE_ALARM, CONFIRMED, MISSED = "false_alarm", "confirmed_defect", "missed_defect"
LABELS = (FALSE_ALARM, CONFIRMED, MISSED)
KEEP, REFIT = "keep", "refit"
POLICIES = (KEEP, REFIT)
DEFAULT_MAX_SHOTS = 32
FROM_FEEDBACK = f"{FOLDER}/"  # sources of references added by feedback start with this


class FeedbackError(ClipInspectError):
    """A feedback or undo that cannot be carried out; the message says why and what to do."""


@dataclasses.dataclass
class FeedbackPolicy:
    thresholds: str = KEEP
    max_shots: int = DEFAULT_MAX_SHOTS

    def check(self) -> "FeedbackPolicy":
        if self.thresholds not in POLICIES:
            raise UsageError(f"threshold policy {self.thresholds!r}: choose one of "
                             f"{', '.join(POLICIES)}{did_you_mean(self.thresholds, POLICIES)}")
        if not isinstance(self.max_shots, int) or self.max_shots < 1:
            raise UsageError(f"memory size {self.max_shots!r}: give a whole number >= 1 of "
                             "reference images")
        return self


def image_suffix(data: bytes) -> str:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        fmt = ""
    return {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp", "tiff": ".tif"}.get(fmt, ".png")


class MemoryBook:
    """The feedback record of one bundle (``feedback/`` inside it)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.folder = self.root / FOLDER
        self.log_path = self.folder / "log.jsonl"

    # ------------------------------------------------------------------ reading
    def entries(self, category: str | None = None) -> list[dict]:
        """The journal, oldest first (of one category, or all)."""
        if not self.log_path.exists():
            return []
        rows = []
        for n, line in enumerate(self.log_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise FeedbackError(f"{str(self.log_path)!r} line {n} is not JSON (a cut-off "
                                    "write?); remove that line and try again") from None
            if category is None or row.get("category") == category:
                rows.append(row)
        return rows

    def state(self, inspector, category: str) -> dict:
        """The category's memory digest, shots, sources and thresholds as the bundle on disk has
        them now (read from its manifest: the inspector's own may be a batch behind)."""
        inspector.bundle.entry(category)  # unknown category -> error naming the others
        entry = read_manifest(inspector.bundle.root).categories[category]
        memory = entry.memory
        return {"memory": memory.sha256 if memory else None,
                "shots": memory.shots if memory else 0,
                "sources": list(memory.sources) if memory else [],
                "thresholds": {k: t.to_dict() for k, t in entry.thresholds.items()}}

    # ------------------------------------------------------------------ changes
    def feedback(self, inspector, category: str, image: bytes, label: str, *, who: str,
                 result_id: str | None = None, score: float | None = None,
                 policy: FeedbackPolicy | None = None) -> dict:
        """Record one operator verdict on a result (``image``: the part's image file bytes);
        a false alarm changes the memory. Returns the journal line."""
        if label not in LABELS:
            raise UsageError(f"label {label!r}: use one of {', '.join(LABELS)}"
                             f"{did_you_mean(label, LABELS)}")
        policy = (policy or FeedbackPolicy()).check()
        inspector.bundle.entry(category)  # unknown category -> error before any work
        with self._locked():
            inspector.refresh()
            before = self.state(inspector, category)
            kept = self._keep_image(category, image, label, result_id)
            row = {"action": label, "category": category, "who": who, "result_id": result_id,
                   "score": score, "image": kept, "before": before}
            if label == FALSE_ALARM:
                row.update(self._add_reference(inspector, category, image, kept, policy))
                row["policy"] = dataclasses.asdict(policy)
            row["after"] = self.state(inspector, category)
            return self._append(row)

    def undo(self, inspector, category: str, *, who: str) -> dict:
        """Put back the memory and thresholds from before the category's last false alarm that
        is not undone yet; repeated, it walks back one change at a time (there is no redo: mark
        the part again)."""
        inspector.bundle.entry(category)
        with self._locked():
            inspector.refresh()
            last = self._undoable(category)
            if last is None:
                raise FeedbackError(f"nothing to undo for category {category!r}: no memory change "
                                    "of it is recorded, or all are undone ('clipinspect memory "
                                    "log BUNDLE --category C' lists them)")
            now = self.state(inspector, category)
            if now["memory"] != last["after"]["memory"]:
                raise FeedbackError(
                    f"the memory of {category!r} was changed outside feedback since change "
                    f"#{last['id']} (its digest is {str(now['memory'])[:12]}, the log says "
                    f"{str(last['after']['memory'])[:12]}), e.g. by 'clipinspect fewshot'; undo "
                    "cannot restore it safely: set the references again with fewshot")
            target = last["before"]
            data = None if target["memory"] is None else self._history(category,
                                                                       target["memory"])
            inspector.bundle.set_memory(category, data, target["sources"], target["shots"],
                                        thresholds=target["thresholds"])
            inspector.refresh()
            return self._append({"action": "undo", "category": category, "who": who,
                                 "undoes": last["id"], "before": now,
                                 "after": self.state(inspector, category)})

    # ------------------------------------------------------------------ helpers
    def _undoable(self, category: str) -> dict | None:
        stack: list[dict] = []
        for row in self.entries(category):
            if row["action"] == FALSE_ALARM:
                stack.append(row)
            elif row["action"] == "undo" and stack and stack[-1]["id"] == row["undoes"]:
                stack.pop()
        return stack[-1] if stack else None

    def _add_reference(self, inspector, category: str, image: bytes, kept: str,
                       policy: FeedbackPolicy) -> dict:
        bundle = inspector.bundle
        rows, _, failed = inspector.build_memory([EncodedImage(image, kept)])
        if failed:
            raise ImageError(f"the image of this result cannot be used: {failed[0][1]}")
        # A line's learner (MuSc's rolling pool) writes what it holds first, so that the memory
        # read below has every part it added; its pool's rule then bounds the memory: at most
        # the pool size, the oldest part leaving first, whoever added it.
        rolling = getattr(inspector, "learner", None)
        if rolling is not None:
            rolling.close()
        limit = rolling.size if rolling is not None else policy.max_shots
        data = bundle.category(category)
        entry = bundle.entry(category).memory
        sources = list(entry.sources) if entry else []
        per_image = bundle.method.output_shapes(bundle.manifest)
        memory = {k: v for k, v in (data.memory or {}).items() if k.startswith("memory_")}
        evicted = []
        if entry and len(sources) != entry.shots:
            sources = [f"(reference {i + 1})" for i in range(entry.shots)]
        while len(sources) + 1 > limit:
            i = 0 if rolling is not None else next(
                (j for j, s in enumerate(sources) if s.startswith(FROM_FEEDBACK)), None)
            if i is None:
                raise FeedbackError(
                    f"the memory of {category!r} is full ({len(sources)} reference images, at "
                    f"most {policy.max_shots}) and holds none added by feedback, which would "
                    "leave first; raise the memory size (--memory-max) or set fewer references "
                    "with 'clipinspect fewshot'")
            for k in memory:
                r = per_image[k[len("memory_"):]][0]
                memory[k] = np.delete(memory[k], np.s_[i * r:(i + 1) * r], axis=0)
            evicted.append(sources.pop(i))
        memory = {k: np.concatenate([memory[k], v]) if k in memory else v
                  for k, v in rows.items()}
        sources.append(kept)
        prepared = bundle.method.prepare_memory(inspector, category, memory)
        thresholds = {k: t.to_dict() for k, t in bundle.entry(category).thresholds.items()}
        refit = []
        if policy.thresholds == REFIT:
            refit = self._refit(inspector, category, prepared, sources, thresholds)
        self._keep_history(category, bundle)
        bundle.set_memory(category, prepared, sources, len(sources), thresholds=thresholds)
        inspector.refresh()
        self._keep_history(category, bundle)
        return {"evicted": evicted, "refit": refit}

    def _refit(self, inspector, category: str, prepared: dict, sources: list[str],
               thresholds: dict) -> list[str]:
        """Refit this precision's few-shot thresholds set on normal images, with the new memory
        (in ``thresholds``, in place). Returns the keys refit."""
        key = f"{inspector.precision}/{FEW_SHOT}"
        old = thresholds.get(key)
        if not old or old.get("method") != NORMAL_RULE or not old.get("normal_images"):
            raise FeedbackError(
                f"threshold policy refit: category {category!r} has no {key} thresholds set on "
                "normal images with their files recorded; set them with 'clipinspect threshold "
                f"BUNDLE --category {category} --normal DIR --mode few-shot' or use the keep "
                "policy")
        images = list(old["normal_images"]) + [str(self.root / s) for s in sources
                                               if s.startswith(FROM_FEEDBACK)]
        with inspector.using_memory(category, prepared):
            fit = from_normal_images(inspector, category, images, old["target_fpr"], FEW_SHOT)
        fit["normal_images"] = old["normal_images"]
        fit["feedback_references"] = len(images) - len(old["normal_images"])
        thresholds[key] = fit
        return [key]

    def _keep_image(self, category: str, image: bytes, label: str,
                    result_id: str | None) -> str:
        """The part's image in the labelled set; returns its path relative to the bundle."""
        split = "defect" if label in (CONFIRMED, MISSED) else "good"
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{stamp}-{result_id or os.urandom(6).hex()}"
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80]
        rel = (f"{FOLDER}/labelled/{_folder(category)}/test/{split}/{name}"
               f"{image_suffix(image)}")
        atomic_write_bytes(self.root / rel, image)
        marker = self.folder / "labelled" / "IMAGE_LEVEL_LABELS"
        if not marker.exists():  # calibration/datasets.py: anomalous images without masks
            atomic_write_bytes(marker, b"Operator feedback: image-level labels, no masks. Use "
                               b"with 'clipinspect threshold --validation' (image threshold).\n")
        return rel

    def _keep_history(self, category: str, bundle) -> None:
        """A copy of the category's current memory file, by digest (kept once)."""
        entry = bundle.entry(category).memory
        if entry is None:
            return
        path = self.folder / "history" / _folder(category) / f"{entry.sha256}.npz"
        if not path.exists():
            atomic_write_bytes(path, (self.root / entry.file).read_bytes())

    def _history(self, category: str, digest: str) -> bytes:
        path = self.folder / "history" / _folder(category) / f"{digest}.npz"
        if not path.is_file():
            raise FeedbackError(f"the memory {digest[:12]} of {category!r} is not in "
                                f"{str(path.parent)!r} any more; it cannot be restored")
        return path.read_bytes()

    def _append(self, row: dict) -> dict:
        """Caller holds the lock."""
        previous = self.entries()
        row = {"id": (previous[-1]["id"] + 1) if previous else 1, "time": time.time(), **row}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _folder(category: str) -> str:
    """The category's folder name (as under the bundle's ``categories/``)."""
    return category_folder(category).rsplit("/", 1)[-1]

"""AprilLab bundles: manifest section (feature levels, projections), encoder outputs, cost
model, and the few-shot score normaliser fixed from the reference images (the map range)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import UsageError
from ..core.manifest import At, is_int, rest, take, take_dict, take_list, take_str
from ..core.names import HEAD_FEWSHOT
from ..core.registry import MemoryContext
from .base import Method, SectionDefaults
from .cost import full_pass_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest

# A few-shot head input [lo, hi] (2,): the range of the few-shot map's maximum over the reference
# images, each scored against the others (the image-score normaliser, fixed before test time);
# stored with the memory.
MAP_RANGE = "reference_map_range"
MIN_MAP_SPAN = 1e-6


@dataclass
class Projections:
    """Where the per-level projections came from: ``kind`` "file" (``path``, ``sha256``, and
    what training recorded in ``trained``: epochs, data, categories, ...) or "random" (``seed``)."""

    kind: str
    path: str | None = None
    sha256: str | None = None
    seed: int | None = None
    trained: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, at: At) -> "Projections":
        kind = take(d, "kind", at, "'file' or 'random'", lambda v: v in ("file", "random"))
        trained = take_dict(d, "trained", at, optional=True)
        if trained is not None:
            take(trained, "categories", at / "trained", "a list of category names",
                 lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                 optional=True)
        return cls(kind, take_str(d, "path", at, optional=kind != "file"),
                   take_str(d, "sha256", at, optional=kind != "file"),
                   take(d, "seed", at, "a whole number", is_int, optional=True), trained,
                   rest(d, ("kind", "path", "sha256", "seed", "trained")))

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "path": self.path, "sha256": self.sha256, "seed": self.seed,
               "trained": self.trained, **self.extra}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class AprilLabSection(SectionDefaults):
    """``layers``: 1-based transformer blocks whose tokens are the feature levels;
    ``projections``: their learned (C -> D) projections; ``activation``: the MLP activation
    both towers ran (None in bundles exported before it was recorded); ``extra``: the rest of
    the ``aprillab`` record (positional embedding, logit scale, map recipe: descriptive)."""

    layers: list[int]
    projections: Projections
    activation: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    KEYS = ("aprillab", "method_options")

    @classmethod
    def from_dict(cls, d: dict, at: At) -> "AprilLabSection":
        section = take_dict(d, "aprillab", at)
        here = at / "aprillab"
        layers = take_list(section, "layers", here, "a list of transformer block numbers",
                           lambda v: is_int(v) and v >= 0)
        projections = Projections.from_dict(take_dict(section, "projections", here),
                                            here / "projections")
        return cls(layers, projections, take_str(section, "activation", here, optional=True),
                   take_dict(d, "method_options", at, optional=True) or {},
                   rest(section, ("layers", "projections", "activation")))

    def to_dict(self) -> dict[str, Any]:
        record = {"layers": list(self.layers), "projections": self.projections.to_dict(),
                  **({"activation": self.activation} if self.activation else {}), **self.extra}
        return {"method_options": self.options, "aprillab": record}

    def summary(self) -> str:
        return f"levels {self.layers}, {self.projections.kind} projections"

    def adapters_categories(self) -> list[str] | None:
        """The categories the projections' checkpoint records they were trained on (None when
        it does not say, or for random projections)."""
        return None if self.projections.trained is None else \
            self.projections.trained.get("categories")

    def adapters_kind(self) -> str | None:
        """"file" or "random": where the learned parts came from."""
        return self.projections.kind


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", *[f"level_tokens_{n}" for n in manifest.section.layers]]


def output_shapes(manifest: "Manifest") -> dict[str, tuple[int, int]]:
    p, c = manifest.dims.patches, manifest.dims.width
    return {"image_embedding": (1, manifest.dims.embed),
            **{f"level_tokens_{n}": (p, c) for n in manifest.section.layers}}


def memory_extras(manifest: "Manifest") -> dict[str, tuple[int, ...]]:
    return {MAP_RANGE: (2,)}


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass at the bundle's input size + one (C -> D) projection of every patch token
    per feature level (in the scoring head)."""
    c, d, p = manifest.dims.width, manifest.dims.embed, manifest.dims.patches
    levels = len(manifest.section.layers)
    return full_pass_gflops(manifest, layers) + levels * 2 * p * c * d / 1e9


def shots_refused(shots: int) -> str | None:
    if 0 < shots < 2:
        return (f"{shots}-shot skipped: this aprillab bundle's few-shot score is normalised by "
                "the spread of the reference images' own maps, which needs at least 2 references")
    return None


def prepare_memory(context: MemoryContext, category: str,
                   memory: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The memory with its map range (computed unless stored with it)."""
    if MAP_RANGE in memory:
        return memory
    return {**memory, MAP_RANGE: reference_map_range(context, category, memory)}


def reference_map_range(context: MemoryContext, category: str,
                        memory: dict[str, np.ndarray]) -> np.ndarray:
    """[lo, hi] (2,) float32: min and max over the K reference images of the few-shot map's
    maximum, each image scored against the memory of the other K - 1 (leave one out: scored
    against itself its few-shot term is 0). Needs K >= 2 and maxima that differ."""
    names = [n for n in memory if n.startswith("memory_")]
    per = context.manifest.dims.patches  # memory rows per reference image
    shots = len(memory[names[0]]) // per
    if shots < 2:
        raise UsageError(f"category {category!r}: {shots} reference image; this bundle's "
                         "few-shot score is normalised by the spread of the reference images' "
                         "own maps, which needs at least 2: add another normal image")
    # The map does not depend on the image embedding (only the score does): zeros stand in.
    feeds = {**context.category_text(category), MAP_RANGE: np.array([0.0, 1.0], np.float32),
             "image_embedding": np.zeros((1, context.manifest.dims.embed), np.float32)}
    peaks = []
    for k in range(shots):
        own = np.arange(k * per, (k + 1) * per)
        for n in names:
            feeds[n[len("memory_"):]] = memory[n][own][None]
            feeds[n] = np.ascontiguousarray(np.delete(memory[n], own, axis=0))
        peaks.append(float(context.run_head(HEAD_FEWSHOT, feeds)["anomaly_grid"].max()))
    lo, hi = min(peaks), max(peaks)
    if hi - lo < MIN_MAP_SPAN:
        raise UsageError(f"category {category!r}: the {shots} reference images' maps all peak at "
                         f"{lo:.6g}, which fixes no score scale; add reference images that "
                         "differ from each other")
    return np.array([lo, hi], np.float32)


METHOD = Method("aprillab", "AprilLab (after APRIL-GAN): intermediate-layer tokens through "
                            "learned per-level projections, scored against the text",
                AprilLabSection, outputs, output_shapes, gflops, memory_extras=memory_extras,
                prepare_memory=prepare_memory, shots_refused=shots_refused)

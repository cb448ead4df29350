"""MuSc bundles (mutual scoring of unlabeled images): manifest section, encoder outputs, cost
model and the scorer the Inspector calls instead of a head graph (numpy, musc_scoring).

A MuSc bundle has one graph per precision, the encoder; its categories' few-shot memory is a
*pool* of earlier normal parts' features (``memory_musc_<l>_r<r>``, K x P rows): with a pool a
part is scored against it at once (streaming mode, for a line); without one the images inspected
together score each other (batch mode: a folder is the pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.manifest import At, is_int, is_num, rest, take, take_dict, take_list, take_str
from .base import Method, SectionDefaults
from .cost import full_pass_gflops
from .musc_scoring import INTERVAL, MIN_OTHERS, default_layers, feature_name, interval_k

__all__ = ["INTERVAL", "METHOD", "MIN_OTHERS", "MuscSection", "default_layers", "feature_name",
           "interval_k", "score"]

if TYPE_CHECKING:
    from ..core.manifest import Manifest

@dataclass
class MuscSection(SectionDefaults):
    """``layers``: 1-based blocks whose residual stream is a feature layer; ``r_list``: the
    aggregation degrees; ``rscin_k``: RsCIN's neighbourhood sizes; ``interval``: the upper end
    of the interval average; ``activation``: the MLP activation the encoder ran; ``pool_size``:
    how many parts a line's rolling pool keeps; ``options``: the export options as recorded."""

    layers: list[int]
    r_list: list[int]
    rscin_k: list[int]
    interval: float
    activation: str | None
    pool_size: int
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    KEYS = ("musc", "method_options")

    @classmethod
    def from_dict(cls, d: dict, at: At) -> "MuscSection":
        s = take_dict(d, "musc", at)
        here = at / "musc"
        whole = "a list of whole numbers >= 1"
        ok = (lambda v: is_int(v) and v >= 1)
        return cls(take_list(s, "layers", here, whole, ok), take_list(s, "r_list", here, whole, ok),
                   take_list(s, "rscin_k", here, whole, ok),
                   take(s, "interval", here, "a number in (0, 1]",
                        lambda v: is_num(v) and 0 < v <= 1),
                   take_str(s, "activation", here, optional=True),
                   take(s, "pool_size", here, f"a whole number >= {MIN_OTHERS}",
                        lambda v: is_int(v) and v >= MIN_OTHERS),
                   take_dict(d, "method_options", at, optional=True) or {},
                   rest(s, ("layers", "r_list", "rscin_k", "interval", "activation",
                            "pool_size")))

    def to_dict(self) -> dict[str, Any]:
        record = {"layers": list(self.layers), "r_list": list(self.r_list),
                  "rscin_k": list(self.rscin_k), "interval": self.interval,
                  "pool_size": self.pool_size,
                  **({"activation": self.activation} if self.activation else {}), **self.extra}
        return {"method_options": self.options, "musc": record}

    def summary(self) -> str:
        return (f"layers {self.layers}, r {self.r_list}, RsCIN k {self.rscin_k}, "
                f"pool {self.pool_size}")

    def features(self) -> list[str]:
        return [feature_name(n, r) for n in self.layers for r in self.r_list]


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", *manifest.section.features()]


def output_shapes(manifest: "Manifest") -> dict[str, tuple[int, int]]:
    p, c = manifest.dims.patches, manifest.dims.width
    return {"image_embedding": (1, manifest.dims.embed),
            **{n: (p, c) for n in manifest.section.features()}}


def gflops(manifest: "Manifest", layers: int) -> float:
    """The encoder's full pass only: the mutual scoring's cost depends on the pool,
    2 P^2 C per feature and pair of images (musc_scoring.pair_gflops)."""
    return full_pass_gflops(manifest, layers)


def shots_refused(shots: int) -> str | None:
    if 0 < shots < MIN_OTHERS:
        return (f"{shots}-part pool skipped: MuSc's interval average needs at least "
                f"{MIN_OTHERS} other images")
    return None


def score(context: Any, encoded: dict[str, np.ndarray],
          memory: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Encoder outputs of a batch (host arrays) -> (image scores (B,), grid maps (B, gh, gw)).
    With ``memory`` (a pool) each image is scored against the pool; without, the images score
    each other and RsCIN re-scores them (batch mode). ``context``: the Inspector (its manifest,
    precision and provider): the block kernel runs on its provider, in int8 for its int8
    graphs (docs/methods.md#musc-precision), else in float32."""
    from . import musc_scoring as ms

    manifest = context.manifest
    s = manifest.section
    grid, size = tuple(manifest.grid), tuple(manifest.preprocess.size)
    how = {"provider": getattr(context.backend, "provider", "cpu"),
           "int8": context.precision == "int8",
           "progress": getattr(context, "scoring_progress", None)}
    feats = {n: encoded[n] for n in s.features()}
    if memory is None:
        return ms.batch_scores(feats, encoded["image_embedding"], s, grid, size, **how)
    pool = {n: memory[f"memory_{n}"].reshape(-1, *encoded[n].shape[1:]) for n in feats}
    return ms.pool_scores(feats, pool, s, grid, size, **how)


METHOD = Method("musc", "MuSc (ICLR 2024): unlabeled images score each other; no prompts, no "
                        "reference images (batch mode), or a rolling pool of normal parts "
                        "(streaming mode)", MuscSection, outputs, output_shapes, gflops,
                graphs=("encoder",), shots_refused=shots_refused, scorer=score,
                learner=lambda inspector, **options: _rolling_pool(inspector, **options))


def _rolling_pool(inspector, **options):
    from .musc_pool import RollingPool

    return RollingPool(inspector, **options)

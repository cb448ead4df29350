"""AprilLab bundles: encoder outputs and cost model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method
from .cost import full_pass_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", *[f"level_tokens_{n}" for n in manifest.aprillab["layers"]]]


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass at the bundle's input size + one (C -> D) projection of every patch token
    per feature level (in the scoring head)."""
    c, d, p = manifest.dims.width, manifest.dims.embed, manifest.dims.patches
    levels = len(manifest.aprillab["layers"])
    return full_pass_gflops(manifest, layers) + levels * 2 * p * c * d / 1e9


METHOD = Method("aprillab", "AprilLab (after APRIL-GAN): intermediate-layer tokens through "
                            "learned per-level projections, scored against the text",
                outputs, gflops)

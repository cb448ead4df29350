"""AprilLab bundles: encoder outputs and cost model."""

from __future__ import annotations

from typing import Any

from .base import Method
from .cost import full_pass_gflops


def outputs(manifest: dict[str, Any]) -> list[str]:
    return ["image_embedding", *[f"level_tokens_{n}" for n in manifest["aprillab"]["layers"]]]


def gflops(manifest: dict[str, Any], layers: int) -> float:
    """One full pass at the bundle's input size + one (C -> D) projection of every patch token
    per feature level (in the scoring head)."""
    c, d, p = manifest["dims"]["width"], manifest["dims"]["embed"], manifest["dims"]["patches"]
    levels = len(manifest["aprillab"]["layers"])
    return full_pass_gflops(manifest, layers) + levels * 2 * p * c * d / 1e9


METHOD = Method("aprillab", "AprilLab (after APRIL-GAN): intermediate-layer tokens through "
                            "learned per-level projections, scored against the text",
                outputs, gflops)

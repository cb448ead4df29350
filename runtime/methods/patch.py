"""Patch-only bundles: encoder outputs and cost model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method
from .cost import full_pass_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", "patch_embeddings", "patch_tokens"]


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass + the dense path: per dense block the value projection and output
    projection of every token and value-value attention, then ln_post and proj of the patches."""
    c, d, p = manifest.dims.width, manifest.dims.embed, manifest.dims.patches
    n = p + 1
    dense = manifest.method_options["dense_blocks"] * (4 * n * c * c + 4 * n * n * c)
    return full_pass_gflops(manifest, layers) + (dense + 2 * p * c * d) / 1e9


METHOD = Method("patch", "patch-only: one encoder pass, dense value-value patch embeddings "
                         "scored against the text (no window passes)", outputs, gflops)

"""WinCLIP / WinCLIP+ bundles: encoder outputs and cost model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method
from .cost import vit_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", *[f"window_embeddings_{k}" for k in manifest.scales],
            "patch_tokens"]


def cost(manifest: "Manifest", layers: int) -> dict[str, float]:
    """GFLOPs per image: ``encode`` one full pass, ``windows`` every window sequence through
    the whole transformer, ``total`` both, ``executed_by_runtime`` less the exact last-block
    shortcut of the exported window passes."""
    c = manifest.dims.width
    p = manifest.dims.patches
    patch = 2 * p * c * 3 * manifest.patch_size ** 2
    encode = vit_gflops(c, layers, [p + 1], patch)
    windows = vit_gflops(c, layers, [1 + k * k for k in manifest.scales
                                     for _ in range(manifest.windows[str(k)])])
    # The exported encoder skips, in the last block of the window passes, the query, output
    # projection and MLP of every token but the class token: 20 C^2 FLOPs per skipped token.
    skipped = sum(k * k * manifest.windows[str(k)] for k in manifest.scales) * 20 * c * c / 1e9
    return {"encode": encode, "windows": windows, "total": encode + windows,
            "executed_by_runtime": encode + windows - skipped}


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass + every window sequence, minus the exact last-block shortcut."""
    return cost(manifest, layers)["executed_by_runtime"]


METHOD = Method("winclip", "WinCLIP / WinCLIP+: image, window (sliding, per scale) and patch "
                           "scores", outputs, gflops)

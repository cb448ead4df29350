"""Cost-model arithmetic the methods share (docs/methods.md#cost-model): matrix-product FLOPs of a ViT,
2 per multiply-add. Pure arithmetic on manifest numbers, so the runtime and the benchmarks can
state a bundle's cost without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.manifest import Manifest


def vit_gflops(width: int, layers: int, seq_lens: list[int], patch_flops: float = 0.0) -> float:
    """Matmul GFLOPs of running sequences of the given lengths through a ViT of ``layers``
    blocks of width C: per block and sequence of n tokens 24 n C^2 (QKV, output projection,
    4x MLP) + 4 n^2 C (attention); ``patch_flops`` of the patch embedding added once."""
    per_layer = sum(24 * n * width ** 2 + 4 * n * n * width for n in seq_lens)
    return (layers * per_layer + patch_flops) / 1e9


def full_pass_gflops(manifest: "Manifest", layers: int) -> float:
    """One ordinary pass of the bundle's image (1 + P tokens), patch embedding included."""
    c, p = manifest.dims.width, manifest.dims.patches
    return vit_gflops(c, layers, [p + 1], 2 * p * c * 3 * manifest.patch_size ** 2)


def transformer_layers(bundle) -> int:
    """Depth of a bundle's vision transformer: from the manifest, or, for bundles exported
    before it was recorded there, the number of MLP input weights (width x 4 width) in the
    encoder graph (needs onnx)."""
    layers = bundle.manifest.dims.layers
    if layers:
        return int(layers)
    import onnx

    c = bundle.manifest.dims.width
    model = onnx.load(str(bundle.graph_path("fp32", "encoder")))
    return sum(1 for t in model.graph.initializer if list(t.dims) == [c, 4 * c])

"""Scoring methods a bundle can hold, keyed by the manifest's ``method`` (no torch here).

The runtime needs little per method, because the graphs say what they take: the encoder's
outputs go to the head inputs of the same name, a head input ``memory_X`` is few-shot memory
made of encoder output X of the reference images, and ``text_*`` inputs come from the
category's text file (``bundle.head_text_arrays``). A method's module here (``base.Method``)
owns its typed manifest section, names the graphs a bundle of that method must list and the
encoder outputs (and their shapes) its manifest must declare, so that a bundle whose graphs do
not match its method is refused on load rather than failing inside onnxruntime, holds its cost
model (GFLOPs per image), and may prepare the few-shot memory (AprilLab's map range). Each
registers itself in ``core.registry``, which core asks. The export side keeps its counterpart
in the export package's methods (how each method is built).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.registry import METHODS, MethodError, method_of, register_method
from . import alfa, aprillab, musc, patch, winclip
from .base import GRAPHS, Method
from .cost import full_pass_gflops, transformer_layers, vit_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest

for _method in (winclip.METHOD, patch.METHOD, aprillab.METHOD, alfa.METHOD, musc.METHOD):
    register_method(_method)

__all__ = ["GRAPHS", "METHODS", "Method", "MethodError", "describe", "full_pass_gflops",
           "gflops_per_image", "method_of", "transformer_layers", "vit_gflops"]


def describe(manifest: "Manifest") -> str:
    """'patch + contextual prompt adaptation (tau 0.01, top-k 5)' and the like."""
    if not manifest.adaptation:
        return manifest.method
    return f"{manifest.method} + {manifest.adaptation.describe()}"


def gflops_per_image(manifest: "Manifest", layers: int | None = None) -> float:
    """Matrix-product GFLOPs the bundle's graphs execute per image, by its method's cost model;
    ``layers``: the transformer depth (default: the manifest's)."""
    method = method_of(manifest)
    return method.gflops(manifest, int(manifest.dims.layers if layers is None else layers))

"""Scoring methods a bundle can hold, keyed by the manifest's ``method`` (no torch here).

The runtime needs little per method, because the graphs say what they take: the encoder's
outputs go to the head inputs of the same name, a head input ``memory_X`` is few-shot memory
made of encoder output X of the reference images, and ``text_*`` inputs come from the
category's text file (``bundle.head_text_arrays``). A method's module here (``base.Method``)
names the graphs a bundle of that method must list and the encoder outputs its manifest must
declare, so that a bundle whose graphs do not match its method is refused on load rather than
failing inside onnxruntime, and holds its cost model (GFLOPs per image). The export side keeps
its counterpart in the export package's methods (how each method is built).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import alfa, aprillab, patch, winclip
from .base import GRAPHS, Method, MethodError
from .cost import full_pass_gflops, transformer_layers, vit_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest

METHODS: dict[str, Method] = {m.name: m for m in (winclip.METHOD, patch.METHOD, aprillab.METHOD,
                                                  alfa.METHOD)}

__all__ = ["GRAPHS", "METHODS", "Method", "MethodError", "describe", "full_pass_gflops",
           "gflops_per_image", "method_of", "transformer_layers", "vit_gflops"]


def method_of(manifest: "Manifest", where: str = "bundle") -> Method:
    """The bundle's method, checked against its manifest (bundles written before methods were
    recorded are WinCLIP; the manifest's prompt adaptation is validated with the manifest)."""
    name = manifest.method
    if name not in METHODS:
        raise MethodError(f"{where} uses method {name!r}, which this clipinspect does not know "
                          f"(it knows {', '.join(METHODS)}); upgrade clipinspect")
    method = METHODS[name]
    declared = manifest.outputs
    if declared is not None and declared != method.outputs(manifest):
        raise MethodError(f"{where}: its manifest lists encoder outputs {declared}, but method "
                          f"{name!r} has {method.outputs(manifest)}; export the bundle again")
    return method


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

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

from typing import Any

from . import aprillab, patch, winclip
from .base import GRAPHS, Method, MethodError
from .cost import full_pass_gflops, transformer_layers, vit_gflops

METHODS: dict[str, Method] = {m.name: m for m in (winclip.METHOD, patch.METHOD, aprillab.METHOD)}

__all__ = ["GRAPHS", "METHODS", "Method", "MethodError", "describe", "full_pass_gflops",
           "gflops_per_image", "method_of", "transformer_layers", "vit_gflops"]


def method_of(manifest: dict[str, Any], where: str = "bundle") -> Method:
    """The bundle's method, checked against its manifest. Bundles written before methods were
    recorded are WinCLIP."""
    name = manifest.get("method", "winclip")
    if name not in METHODS:
        raise MethodError(f"{where} uses method {name!r}, which this clipinspect does not know "
                          f"(it knows {', '.join(METHODS)}); upgrade clipinspect")
    method = METHODS[name]
    declared = manifest.get("outputs")
    if declared is not None and declared != method.outputs(manifest):
        raise MethodError(f"{where}: its manifest lists encoder outputs {declared}, but method "
                          f"{name!r} has {method.outputs(manifest)}; export the bundle again")
    adaptation = manifest.get("adaptation")
    if adaptation is not None:
        tau, top_k = adaptation.get("tau"), adaptation.get("top_k")
        if adaptation.get("kind") != "contextual" or not (isinstance(tau, (int, float)) and tau > 0) \
                or not (top_k is None or (isinstance(top_k, int) and top_k >= 1)):
            raise MethodError(f"{where}: unknown or invalid prompt adaptation {adaptation!r}; "
                              "export the bundle again")
    return method


def describe(manifest: dict[str, Any]) -> str:
    """'patch + contextual prompt adaptation (tau 0.01, top-k 5)' and the like."""
    name = manifest.get("method", "winclip")
    adaptation = manifest.get("adaptation")
    if not adaptation:
        return name
    top_k = f", top-k {adaptation['top_k']}" if adaptation.get("top_k") else ""
    return f"{name} + contextual prompt adaptation (tau {adaptation['tau']:g}{top_k})"


def gflops_per_image(manifest: dict[str, Any], layers: int | None = None) -> float:
    """Matrix-product GFLOPs the bundle's graphs execute per image, by its method's cost model;
    ``layers``: the transformer depth (default: the manifest's)."""
    method = method_of(manifest)
    return method.gflops(manifest, int(layers or manifest["dims"]["layers"]))

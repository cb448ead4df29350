"""Scoring methods a bundle can hold, keyed by the manifest's ``method`` (no torch here).

The runtime needs little per method, because the graphs say what they take: the encoder's
outputs go to the head inputs of the same name, a head input ``memory_X`` is few-shot memory
made of encoder output X of the reference images, and ``text_*`` inputs come from the
category's text file (``bundle.head_text_arrays``). An entry here names the graphs a bundle of
that method must list and the encoder outputs its manifest must declare, so that a bundle whose
graphs do not match its method is refused on load rather than failing inside onnxruntime.
The export side keeps its counterpart in export/methods.py (how each method is built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..core.errors import ClipInspectError

if TYPE_CHECKING:
    from ..core.manifest import Manifest

GRAPHS = ("encoder", "head_zeroshot", "head_fewshot")


class MethodError(ClipInspectError, ValueError):
    """A bundle's method is unknown or its manifest does not match it."""


@dataclass(frozen=True)
class Method:
    """summary: one line for ``clipinspect info``; outputs(manifest) -> the encoder outputs a
    bundle of this method has, in order; graphs: the graphs every precision must list."""

    name: str
    summary: str
    outputs: Callable[["Manifest"], list[str]]
    graphs: tuple[str, ...] = GRAPHS


METHODS: dict[str, Method] = {
    "winclip": Method(
        "winclip", "WinCLIP / WinCLIP+: image, window (sliding, per scale) and patch scores",
        lambda m: ["image_embedding", *[f"window_embeddings_{k}" for k in m.scales],
                   "patch_tokens"]),
    "patch": Method(
        "patch", "patch-only: one encoder pass, dense value-value patch embeddings scored "
                 "against the text (no window passes)",
        lambda m: ["image_embedding", "patch_embeddings", "patch_tokens"]),
    "aprillab": Method(
        "aprillab", "AprilLab (after APRIL-GAN): intermediate-layer tokens through learned "
                    "per-level projections, scored against the text",
        lambda m: ["image_embedding", *[f"level_tokens_{n}" for n in m.aprillab["layers"]]]),
}


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

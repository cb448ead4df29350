"""Patch-only bundles: manifest section (dense blocks), encoder outputs and cost model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.manifest import At, is_positive_int, take, take_dict
from .base import Method, SectionDefaults, token_shapes
from .cost import full_pass_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest


@dataclass
class PatchSection(SectionDefaults):
    """``dense_blocks``: the last blocks whose value-value attention makes the patch
    embeddings; ``options``: the export options as recorded (``method_options``)."""

    dense_blocks: int
    options: dict[str, Any] = field(default_factory=dict)

    KEYS = ("method_options",)

    @classmethod
    def from_dict(cls, d: dict, at: At) -> "PatchSection":
        options = take_dict(d, "method_options", at)
        return cls(take(options, "dense_blocks", at / "method_options", "a whole number >= 1",
                        is_positive_int), options)

    def to_dict(self) -> dict[str, Any]:
        return {"method_options": {**self.options, "dense_blocks": self.dense_blocks}}

    def summary(self) -> str:
        return f"dense blocks {self.dense_blocks}"



def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", "patch_embeddings", "patch_tokens"]


def output_shapes(manifest: "Manifest") -> dict[str, tuple[int, int]]:
    return {**token_shapes(manifest),
            "patch_embeddings": (manifest.dims.patches, manifest.dims.embed)}


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass + the dense path: per dense block the value projection and output
    projection of every token and value-value attention, then ln_post and proj of the patches."""
    c, d, p = manifest.dims.width, manifest.dims.embed, manifest.dims.patches
    n = p + 1
    dense = manifest.section.dense_blocks * (4 * n * c * c + 4 * n * n * c)
    return full_pass_gflops(manifest, layers) + (dense + 2 * p * c * d) / 1e9


METHOD = Method("patch", "patch-only: one encoder pass, dense value-value patch embeddings "
                         "scored against the text (no window passes)", PatchSection, outputs,
                output_shapes, gflops)

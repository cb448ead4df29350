"""WinCLIP / WinCLIP+ bundles: manifest section (window scales and counts), encoder outputs
and cost model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.manifest import At, is_positive_int, take, take_dict, take_list
from .base import Method, SectionDefaults, token_shapes
from .cost import vit_gflops

if TYPE_CHECKING:
    from ..core.manifest import Manifest


@dataclass
class WinClipSection(SectionDefaults):
    """``scales``: window sizes k (k x k patches, stride 1); ``windows``: scale -> number of
    windows (None in bundles exported before it was recorded); ``options``: the export options
    as recorded (``method_options``)."""

    scales: list[int]
    windows: dict[str, int] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    KEYS = ("scales", "windows", "method_options")

    @classmethod
    def from_dict(cls, d: dict, at: At) -> "WinClipSection":
        windows = take(d, "windows", at, "an object of scale -> number of windows",
                       lambda v: isinstance(v, dict) and all(map(is_positive_int, v.values()))
                       and all(k.isdigit() and k.isascii() for k in v), optional=True)
        return cls(take_list(d, "scales", at, "a list of window sizes (whole numbers > 0)",
                             is_positive_int), windows,
                   take_dict(d, "method_options", at, optional=True) or {})

    def to_dict(self) -> dict[str, Any]:
        out = {"method_options": self.options, "scales": list(self.scales)}
        return out if self.windows is None else {**out, "windows": self.windows}

    def check(self, manifest: "Manifest", at: At) -> None:
        """Window scales that fit the grid, and their window counts (every k x k window)."""
        grid = manifest.grid
        for k in self.scales:
            if k > min(grid):
                raise (at / "scales").error(self.scales, f"window sizes from 1 to {min(grid)} "
                                            "(the grid)")
            count = window_count(grid, k)
            if self.windows is not None and str(k) in self.windows and self.windows[str(k)] != count:
                raise (at / "windows" / k).error(self.windows[str(k)], f"{count}, the {k}x{k} "
                                                 f"windows of the {grid[0]}x{grid[1]} grid")

    def summary(self) -> str:
        return f"scales {self.scales}"



def window_count(grid: tuple[int, int], k: int) -> int:
    return (grid[0] - k + 1) * (grid[1] - k + 1)


def outputs(manifest: "Manifest") -> list[str]:
    return ["image_embedding", *[f"window_embeddings_{k}" for k in manifest.section.scales],
            "patch_tokens"]


def output_shapes(manifest: "Manifest") -> dict[str, tuple[int, int]]:
    d = manifest.dims.embed
    return {**token_shapes(manifest),
            **{f"window_embeddings_{k}": (window_count(manifest.grid, k), d)
               for k in manifest.section.scales}}


def cost(manifest: "Manifest", layers: int) -> dict[str, float]:
    """GFLOPs per image: ``encode`` one full pass, ``windows`` every window sequence through
    the whole transformer, ``total`` both, ``executed_by_runtime`` less the exact last-block
    shortcut of the exported window passes."""
    c = manifest.dims.width
    p = manifest.dims.patches
    scales = manifest.section.scales
    counts = {k: window_count(manifest.grid, k) for k in scales}
    patch = 2 * p * c * 3 * manifest.patch_size ** 2
    encode = vit_gflops(c, layers, [p + 1], patch)
    windows = vit_gflops(c, layers, [1 + k * k for k in scales for _ in range(counts[k])])
    # The exported encoder skips, in the last block of the window passes, the query, output
    # projection and MLP of every token but the class token: 20 C^2 FLOPs per skipped token.
    skipped = sum(k * k * counts[k] for k in scales) * 20 * c * c / 1e9
    return {"encode": encode, "windows": windows, "total": encode + windows,
            "executed_by_runtime": encode + windows - skipped}


def gflops(manifest: "Manifest", layers: int) -> float:
    """One full pass + every window sequence, minus the exact last-block shortcut."""
    return cost(manifest, layers)["executed_by_runtime"]


METHOD = Method("winclip", "WinCLIP / WinCLIP+: image, window (sliding, per scale) and patch "
                           "scores", WinClipSection, outputs, output_shapes, gflops)

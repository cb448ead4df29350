"""What a scoring method is to the runtime (no torch): the fields of a registry entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import ClipInspectError

GRAPHS = ("encoder", "head_zeroshot", "head_fewshot")


class MethodError(ClipInspectError, ValueError):
    """A bundle's method is unknown or its manifest does not match it."""


@dataclass(frozen=True)
class Method:
    """summary: one line for ``clipinspect info``; outputs(manifest) -> the encoder outputs a
    bundle of this method has, in order; gflops(manifest, layers) -> matrix-product GFLOPs the
    exported graphs execute per image for a ``layers``-block transformer (the cost model);
    graphs: the graphs every precision must list."""

    name: str
    summary: str
    outputs: Callable[[dict[str, Any]], list[str]]
    gflops: Callable[[dict[str, Any], int], float]
    graphs: tuple[str, ...] = GRAPHS

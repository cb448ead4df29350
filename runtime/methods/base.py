"""What a scoring method is to the runtime (no torch): the fields of a registry entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..core.errors import ClipInspectError
from ..core.names import GRAPHS

if TYPE_CHECKING:
    from ..core.manifest import Manifest


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
    outputs: Callable[["Manifest"], list[str]]
    gflops: Callable[["Manifest", int], float]
    graphs: tuple[str, ...] = GRAPHS

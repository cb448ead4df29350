"""What a scoring method is to the runtime (no torch): the fields of a registry entry
(``core.registry.MethodSpec``), and the manifest-section base its sections build on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..core.manifest import At
from ..core.names import GRAPHS
from ..core.registry import MemoryContext, MethodError

if TYPE_CHECKING:
    import numpy as np

    from ..core.manifest import Manifest

__all__ = ["GRAPHS", "Method", "MethodError", "SectionDefaults"]


class SectionDefaults:
    """What a method section (core.registry.MethodSection) does unless it says otherwise:
    nothing more to check against the rest of the manifest, no learned parts."""

    def check(self, manifest: "Manifest", at: At) -> None:
        return None

    def adapters_categories(self) -> list[str] | None:
        return None

    def adapters_kind(self) -> str | None:
        return None


def _no_extras(manifest: "Manifest") -> dict[str, tuple[int, ...]]:
    return {}


def _same_memory(context: MemoryContext, category: str,
                 memory: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    return memory


def _any_shots(shots: int) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """summary: one line for ``clipinspect info``; section: its manifest section class;
    outputs(manifest) -> the encoder outputs a bundle of this method has, in order;
    output_shapes(manifest) -> {output: (rows, width)} per image; gflops(manifest, layers) ->
    matrix-product GFLOPs the exported graphs execute per image for a ``layers``-block
    transformer (the cost model); graphs: the graphs every precision must list; the hooks
    memory_extras, prepare_memory and shots_refused as in ``core.registry.MethodSpec``;
    scorer(inspector, encoded, memory) -> (image scores, grid maps) for a method scored on the
    host instead of by head graphs (None: the heads score), ``encoded`` host arrays of a batch
    and ``memory`` the category's (None: the batch scores itself); learner(inspector, **options)
    -> what ``Inspector.stream`` installs for a line (None: nothing learns)."""

    name: str
    summary: str
    section: type
    outputs: Callable[["Manifest"], list[str]]
    output_shapes: Callable[["Manifest"], dict[str, tuple[int, int]]]
    gflops: Callable[["Manifest", int], float]
    graphs: tuple[str, ...] = GRAPHS
    memory_extras: Callable[["Manifest"], dict[str, tuple[int, ...]]] = _no_extras
    prepare_memory: Callable[..., dict] = _same_memory
    shots_refused: Callable[[int], str | None] = _any_shots
    scorer: Callable[..., tuple["np.ndarray", "np.ndarray"]] | None = None
    learner: Callable[..., object] | None = None


def token_shapes(manifest: "Manifest") -> dict[str, tuple[int, int]]:
    """(rows, width) per image of the outputs most methods share: the image embedding (1, D)
    and the patch tokens (P, C)."""
    return {"image_embedding": (1, manifest.dims.embed),
            "patch_tokens": (manifest.dims.patches, manifest.dims.width)}


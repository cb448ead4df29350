"""Optimization profiles: the (min, opt, max) shape of every graph input that TensorRT, native
or through onnxruntime's TensorRT provider, builds engines for. Pure shape arithmetic over a
bundle's graphs (needs the ``onnx`` package, imported when called); both backends use it, so it
lives on the ground floor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .errors import ClipInspectError
from .names import HEADS

DEFAULT_MAX_SHOTS = 16
# Prompts per state in a category's pool (prompt adaptation): the compositional ensemble has 147
# normal and 84 anomalous prompts before the ambiguity filter; prompt files add to them. The
# minimum is the adaptation's top-k (prompt_pool): its TopK needs at least k rows.
PROMPT_POOL = (1, 256, 2048)


class CompatibilityError(ClipInspectError, ValueError):
    """A graph TensorRT would reject; the message lists every problem found."""


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 8
    max: int = 32

    def validate(self) -> "BatchRange":
        if not 1 <= self.min <= self.opt <= self.max:
            raise CompatibilityError(f"batch range min {self.min}, opt {self.opt}, max "
                                     f"{self.max}: need 1 <= min <= opt <= max")
        return self


def value_dims(value) -> list[int | None]:
    """Dimensions of a graph input or output (``onnx.ValueInfoProto``); None where dynamic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in value.type.tensor_type.shape.dim]


def head_inputs(bundle: Bundle, outputs: bool = False) -> dict[str, list[int | None]]:
    """{input: dims} of the bundle's FP32 scoring heads, merged (``outputs``: their outputs). By
    the bundle's convention an input ``memory_X`` is few-shot memory made of encoder output X,
    ``text_*`` comes from the category's text file, and every other input is an encoder output
    of the same name."""
    import onnx

    found: dict[str, list[int | None]] = {}
    for name in HEADS:
        model = onnx.load(str(bundle.graph_path("fp32", name)), load_external_data=False)
        values = model.graph.output if outputs else model.graph.input
        found.update({v.name: value_dims(v) for v in values})
    return found


def is_category_input(name: str) -> bool:
    """Head inputs that come from the category (text, few-shot memory), not from the encoder."""
    return name.startswith(("text_", "memory_"))


def dynamic_rows(bundle: Bundle) -> dict[str, int]:
    """Rows per reference image of each few-shot memory input (memory = shots x rows): encoder
    output X of shape (B, N, D) gives N rows per image, one of shape (B, D) one row."""
    inputs = head_inputs(bundle)
    rows = {}
    for name in inputs:
        if name.startswith("memory_"):
            source = inputs.get(name[len("memory_"):])
            if source is None or any(d is None for d in source[1:]):
                raise CompatibilityError(f"few-shot memory input {name!r} has no encoder output "
                                         f"of static shape to size its profile: {source}")
            rows[name] = int(np.prod(source[1:-1], dtype=np.int64)) if len(source) > 2 else 1
    return rows


def prompt_pool(bundle: Bundle) -> tuple[int, int, int]:
    """(min, opt, max) rows of a prompt pool input: at least the adaptation's top-k."""
    adaptation = bundle.manifest.adaptation
    k = int(adaptation.top_k) if adaptation is not None and adaptation.top_k else 1
    lo, opt, hi = PROMPT_POOL
    if k > hi:
        raise CompatibilityError(f"prompt adaptation top-k {k} is larger than the prompt pools "
                                 f"a TensorRT profile covers ({hi}); export with a smaller top_k")
    return max(lo, k), max(opt, k), hi


def profile_shapes(bundle: Bundle, model, batch: BatchRange, max_shots: int = DEFAULT_MAX_SHOTS,
                   opt_shots: int = 4) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input: (min shape, opt shape, max shape)} covering every input of ``model``.

    The batch axis (a symbolic first dimension shared by the encoder outputs) spans the batch
    range; few-shot memory rows span 1..max_shots reference images; every other dimension must
    be static. Raises CompatibilityError for an input no profile can cover.
    """
    batch.validate()
    if max_shots < 1:
        raise CompatibilityError(f"max shots {max_shots}: need at least 1")
    opt_shots = min(max(opt_shots, 1), max_shots)
    rows = dynamic_rows(bundle)
    pool = prompt_pool(bundle)
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    problems = []
    for value in model.graph.input:
        tt = value.type.tensor_type
        if not tt.HasField("shape"):
            problems.append(f"input {value.name!r} has no known rank")
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        lo, opt, hi = [], [], []
        for axis, d in enumerate(dims):
            if d is not None and d > 0:
                span = (d, d, d)
            elif axis == 0 and value.name in rows:
                r = rows[value.name]
                span = (r, r * opt_shots, r * max_shots)
            elif axis == 0 and value.name.startswith("text_"):
                span = pool  # a category's prompt pool (prompt adaptation)
            elif axis == 0:
                span = (batch.min, batch.opt, batch.max)
            else:
                problems.append(f"input {value.name!r} axis {axis} is dynamic; only the batch "
                                "axis, few-shot memory rows and prompt pools may be")
                break
            lo.append(span[0])
            opt.append(span[1])
            hi.append(span[2])
        else:
            shapes[value.name] = (tuple(lo), tuple(opt), tuple(hi))
    if problems:
        raise CompatibilityError("; ".join(problems))
    return shapes

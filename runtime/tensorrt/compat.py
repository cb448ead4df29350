"""Static TensorRT compatibility of a bundle's ONNX graphs, checked without TensorRT.

What TensorRT's ONNX parser accepts is encoded as data in ``onnx_ops.json`` (the
operator table published with one TensorRT release, its source named in the file). A graph is
compatible with a target TensorRT version when:

- every node is in the default ONNX domain and its operator is in the table, and was not added
  after the target version;
- the opset is >= 17 (LayerNormalization) and within the target's documented opset range;
- there is no DynamicQuantizeLinear, and every Quantize/DequantizeLinear has positive scales and
  an INT8 zero point that is 0 (TensorRT's explicit quantization is symmetric);
- the parser's documented restrictions on the operators used hold (constant ``axes``, only
  LayerNormalization's first output, ...);
- an optimization profile covers every input: see :func:`profile_shapes`.

build-engine runs these checks before it calls TensorRT, and the tests run them on every graph a
bundle holds. Needs the ``onnx`` package (imported when called).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.bundle import Bundle
from ..core.errors import ClipInspectError
from ..core.names import HEADS

OPS_FILE = Path(__file__).with_name("onnx_ops.json")
MIN_OPSET = 17
# JetPack 6.1 / 6.2 ship TensorRT 10.3: the oldest TensorRT this project builds engines with.
DEFAULT_TARGET = "10.3"
DEFAULT_MAX_SHOTS = 16
# Prompts per state in a category's pool (prompt adaptation): the compositional ensemble has 147
# normal and 84 anomalous prompts before the ambiguity filter; prompt files add to them. The
# minimum is the adaptation's top-k (prompt_pool): its TopK needs at least k rows.
PROMPT_POOL = (1, 256, 2048)


class CompatibilityError(ClipInspectError, ValueError):
    """A graph TensorRT would reject; the message lists every problem found."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


@functools.lru_cache(maxsize=1)
def operator_table() -> dict[str, Any]:
    return json.loads(OPS_FILE.read_text())


def opset_range(target: str) -> tuple[int, int]:
    """The documented opset range of the newest table release <= target (the oldest when the
    target predates them all: conservative)."""
    ranges = sorted(operator_table()["opset_range"].items(), key=lambda kv: _version(kv[0]))
    chosen = ranges[0][1]
    for version, rng in ranges:
        if _version(version) <= _version(target):
            chosen = rng
    return int(chosen[0]), int(chosen[1])


def _constant_names(graph) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _attr(node, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def check_model(model, target: str = DEFAULT_TARGET) -> list[str]:
    """Problems TensorRT ``target`` would have with ``model`` (an onnx.ModelProto); [] if none."""
    from onnx import numpy_helper

    table = operator_table()
    supported = set(table["supported"])
    added = {op: _version(v) for op, v in table["added_in"].items()}
    problems: list[str] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = opset_range(target)
    if opset is None or opset < max(MIN_OPSET, lo) or opset > hi:
        problems.append(f"opset {opset}: TensorRT {target} needs {max(MIN_OPSET, lo)}..{hi} "
                        f"(LayerNormalization needs >= {MIN_OPSET})")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    constants = _constant_names(graph)
    consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in graph.node:
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} (no TensorRT importer)")
            continue
        op = node.op_type
        if op not in supported:
            problems.append(f"{where}: not in TensorRT's ONNX operator table "
                            f"({table['table_version']})")
            continue
        if op in added and added[op] > _version(target):
            problems.append(f"{where}: supported only from TensorRT "
                            f"{table['added_in'][op]}, the target is {target}")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            problems += _check_qdq(node, where, inits, numpy_helper)
        elif op.startswith("Reduce") or op in ("Squeeze", "Unsqueeze"):
            if len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
                problems.append(f"{where}: axes come from a computed tensor; TensorRT needs "
                                "a constant")
        elif op == "CumSum" and node.input[1] not in constants:
            problems.append(f"{where}: axis must be a constant")
        elif op == "LayerNormalization":
            if any(o and o in consumed for o in node.output[1:]):
                problems.append(f"{where}: only the first output (Y) is supported")
        elif op == "TopK" and _attr(node, "sorted", 1) != 1:
            problems.append(f"{where}: sorted must be 1")
        elif op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings")
                                      for a in node.attribute):
            problems.append(f"{where}: sparse or string constants are unsupported")
    return problems


def _check_qdq(node, where: str, inits: dict, numpy_helper) -> list[str]:
    problems = []
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        problems.append(f"{where}: scale is not an initializer (TensorRT needs constant scales)")
    elif not (numpy_helper.to_array(scale) > 0).all():
        problems.append(f"{where}: scale has values <= 0")
    zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is None:
        # Without a zero point ONNX means uint8 with 0: TensorRT's INT8 is signed.
        problems.append(f"{where}: no zero point given (defaults to uint8); use an int8 zero "
                        "point of 0")
    else:
        z = numpy_helper.to_array(zero)
        if z.dtype != np.int8:
            problems.append(f"{where}: zero point type {z.dtype} (TensorRT INT8 needs int8)")
        if z.any():
            problems.append(f"{where}: zero point is not 0 (TensorRT quantization is symmetric)")
    return problems


# ----------------------------------------------------------------------------- profiles
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


def graph_files(bundle: Bundle) -> dict[str, Path]:
    """Every graph file the bundle references, once: {'<precision>/<graph>': path}."""
    seen: dict[Path, str] = {}
    # fp32 first: the variants share its heads, which are then named after it.
    for precision, graphs in sorted(bundle.manifest.graphs.items(),
                                    key=lambda kv: (kv[0] != "fp32", kv[0])):
        for name, entry in graphs.items():
            path = bundle.root / entry.file
            seen.setdefault(path, f"{precision}/{name}")
    return {label: path for path, label in seen.items()}


def check_bundle(bundle: Bundle, target: str = DEFAULT_TARGET,
                 batch: BatchRange = BatchRange(), max_shots: int = DEFAULT_MAX_SHOTS
                 ) -> dict[str, list[str]]:
    """{'<precision>/<graph>': problems} for every graph file of the bundle."""
    import onnx

    report = {}
    for label, path in graph_files(bundle).items():
        model = onnx.load(str(path))
        problems = check_model(model, target)
        try:
            profile_shapes(bundle, model, batch, max_shots)
        except CompatibilityError as e:
            problems.append(str(e))
        report[label] = problems
    return report


def require_compatible(bundle: Bundle, labels: list[str], target: str = DEFAULT_TARGET,
                       batch: BatchRange = BatchRange(),
                       max_shots: int = DEFAULT_MAX_SHOTS) -> None:
    report = check_bundle(bundle, target, batch, max_shots)
    bad = {k: v for k, v in report.items() if k in labels and v}
    if bad:
        lines = "; ".join(f"{k}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                          for k, v in bad.items())
        raise CompatibilityError(f"TensorRT {target} would reject these graphs: {lines}. "
                                 "Export or quantize the bundle again with this clipinspect")

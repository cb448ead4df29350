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
from pathlib import Path
from typing import Any

import numpy as np

from ..core.bundle import Bundle
from ..core.names import FUSED_ENCODER
# Profiles are shared with onnxruntime's TensorRT provider (core); named here too.
from ..core.profiles import (DEFAULT_MAX_SHOTS, PROMPT_POOL, BatchRange,  # noqa: F401
                             CompatibilityError, dynamic_rows, head_inputs, is_category_input,
                             profile_shapes, prompt_pool, value_dims)

OPS_FILE = Path(__file__).with_name("onnx_ops.json")
MIN_OPSET = 17
# JetPack 6.1 / 6.2 ship TensorRT 10.3: the oldest TensorRT this project builds engines with.
DEFAULT_TARGET = "10.3"
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


def graph_files(bundle: Bundle) -> dict[str, Path]:
    """Every graph file of the bundle that TensorRT may build, once:
    {'<precision>/<graph>': path}. The fused-attention encoders are onnxruntime's own
    (com.microsoft operators, run by its CPU provider only) and not among them."""
    seen: dict[Path, str] = {}
    # fp32 first: the variants share its heads, which are then named after it.
    for precision, graphs in sorted(bundle.manifest.graphs.items(),
                                    key=lambda kv: (kv[0] != "fp32", kv[0])):
        for name, entry in graphs.items():
            if name == FUSED_ENCODER:
                continue
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

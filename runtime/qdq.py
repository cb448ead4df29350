"""An exact rewrite of INT8 QDQ graphs for x86 CPUs with VNNI.

The bundle's INT8 graph is quantized the portable way (signed 8-bit activations and weights,
zero points 0), which TensorRT's explicit quantization requires and CUDA accepts. On x86, the
VNNI dot-product instruction multiplies *unsigned* by signed bytes, and onnxruntime runs
signed-by-signed products markedly slower there. Shifting an activation's quantized values by
128 (int8 with zero point 0 -> uint8 with zero point 128) changes no dequantized value:

    (clamp(round(x / s), -128, 127) + 128) - 128 == clamp(round(x / s) + 128, 0, 255) - 128

so every activation QuantizeLinear/DequantizeLinear pair is rewritten that way in memory when
the graph is loaded on such a CPU; weights stay signed. Nothing on disk changes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np


def cpu_has_vnni() -> bool:
    """True on x86 CPUs with AVX512-VNNI or AVX-VNNI (Linux /proc/cpuinfo flags)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni"})
    return False


def unsigned_activations(path: Path) -> tuple[bytes, int]:
    """Load the QDQ graph at ``path`` and return (serialized graph, number of activation
    quantizers rewritten) with every int8 activation zero point 0 turned into uint8 128."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - the cpu extra installs onnx
        raise ImportError("the INT8 CPU path needs the 'onnx' package: "
                          "pip install 'clipinspect[cpu]'") from e
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], []).append(node)
    shifted: dict[str, str] = {}  # int8 zero-point initializer -> its uint8 replacement
    count = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        if node.input[0] in inits:  # a weight quantized in the graph: leave it signed
            continue
        zp_name = node.input[2]
        zp = inits.get(zp_name)
        if zp is None:
            continue
        value = numpy_helper.to_array(zp)
        if value.dtype != np.int8 or value.size != 1 or int(value.ravel()[0]) != 0:
            continue
        if zp_name not in shifted:
            new = numpy_helper.from_array(np.full(value.shape, 128, np.uint8), zp_name + "_u8")
            graph.initializer.append(new)
            shifted[zp_name] = new.name
        node.input[2] = shifted[zp_name]
        for reader in readers.get(node.output[0], []):
            reader.input[2] = shifted[zp_name]
        count += 1
    still_read = {i for n in graph.node for i in n.input}
    unused = [t for t in graph.initializer if t.name in shifted and t.name not in still_read]
    for t in unused:
        graph.initializer.remove(t)
    return model.SerializeToString(), count

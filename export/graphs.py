"""Tracing a method's encoder and heads into ONNX, and checking onnxruntime against them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipinspect.runtime.core.names import FUSED_ENCODER

from .defaults import PARITY_IMAGES
from .errors import ExportError, log
from .methods import Built


def _export(module: torch.nn.Module, args: tuple, path: Path, *, input_names: list[str],
            output_names: list[str], dynamic_axes: dict, opset: int,
            custom_opsets: dict[str, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Traced without autograd: the graph is the same (same bytes, checked on ViT-S-16) and the
    # trace does not keep every intermediate for a backward pass that never comes.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values
        torch.onnx.export(module, args, str(path), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False,
                          custom_opsets=custom_opsets)
    import onnx
    onnx.checker.check_model(str(path))


def input_size(encoder: torch.nn.Module) -> tuple[int, int]:
    """(H, W) the encoder takes: its own when it resamples positions (aprillab), else CLIP's."""
    size = getattr(encoder, "image_size", None) or encoder.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class Probe:
    """The parity check's inputs, fixed by a seed. The references (the check's few-shot
    memory) are also what the graphs are traced on, and their torch encoder outputs are
    computed once for both; the checked images are never seen by the tracer, and their batch
    (3 by default; 1 or more) differs from the traced one (2) unless it is 2 too."""
    images: torch.Tensor       # (n_images, 3, H, W), PARITY_IMAGES by default
    references: torch.Tensor   # (2, 3, H, W)
    reference_outputs: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, encoder: torch.nn.Module, n_images: int = PARITY_IMAGES, seed: int = 123
           ) -> "Probe":
        gen = torch.Generator().manual_seed(seed)
        size = input_size(encoder)
        images = torch.randn(n_images, 3, *size, generator=gen)
        return cls(images, torch.randn(2, 3, *size, generator=gen))


def export_graphs(built: Built, root: Path, opset: int, probe: Probe,
                  fused_attention: bool = False) -> dict[str, str]:
    """Write fp32/encoder.onnx and fp32/head_*.onnx (and with ``fused_attention`` the
    onnxruntime-only fp32/encoder_fused.onnx); returns name -> relative path. Fills
    ``probe.reference_outputs`` (the heads are traced on them)."""
    encoder = built.encoder
    outs = encoder.output_names()
    files = {"encoder": "fp32/encoder.onnx"}
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in outs}}
    _export(encoder, (probe.references,), root / files["encoder"], input_names=["images"],
            output_names=outs, dynamic_axes=axes, opset=opset)
    if fused_attention:
        # The same module traced a second time with its attention as onnxruntime's fused
        # operator: an onnxruntime-only graph (TensorRT and Triton keep the standard one).
        files[FUSED_ENCODER] = f"fp32/{FUSED_ENCODER}.onnx"
        encoder.fused_attention = True
        try:
            _export(encoder, (probe.references,), root / files[FUSED_ENCODER],
                    input_names=["images"], output_names=outs, dynamic_axes=axes, opset=opset,
                    custom_opsets={"com.microsoft": 1})
        finally:
            encoder.fused_attention = False
    with torch.no_grad():
        probe.reference_outputs = dict(zip(outs, encoder(probe.references)))
    for name, head in built.heads.items():
        inputs = head_example_inputs(head, probe.reference_outputs)
        fixed = ("text_prototypes", *getattr(head, "example_inputs", dict)())
        axes = {n: ({0: n} if n.startswith("memory_") or n in ("text_normal", "text_anomalous")
                    else {} if n in fixed else {0: "batch"}) for n in inputs}
        axes.update(image_score={0: "batch"}, anomaly_grid={0: "batch"})
        files[name] = f"fp32/{name}.onnx"
        _export(head, tuple(inputs.values()), root / files[name], input_names=list(inputs),
                output_names=["image_score", "anomaly_grid"], dynamic_axes=axes, opset=opset)
    return files


def example_text(head: torch.nn.Module, dim: int) -> dict[str, torch.Tensor]:
    """Random category text for a head: prototypes (2, D), or prompt pools of two different
    sizes (so the traced graph keeps them dynamic), each at least top-k long."""
    gen = torch.Generator().manual_seed(1)
    if getattr(head, "adaptation", None) is None:
        return {"text_prototypes": torch.randn(2, dim, generator=gen)}
    n = (head.adaptation.top_k or 1) + 4
    return {"text_normal": torch.randn(n + 1, dim, generator=gen),
            "text_anomalous": torch.randn(n, dim, generator=gen)}


def head_example_inputs(head: torch.nn.Module, encoded: dict[str, torch.Tensor],
                        text: dict[str, torch.Tensor] | None = None,
                        memory: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The head's inputs by name: encoder outputs, category text, few-shot memory (``memory_X``
    holds encoder output X of reference images, flattened over images)."""
    if text is None:
        text = example_text(head, encoded["image_embedding"].shape[-1])
    if memory is None:
        # Memory of a *different* shape from the batch, so the traced graph keeps it dynamic.
        memory = {n: encoded[n[len("memory_"):]][:1].flatten(0, 1) for n in head.input_names()
                  if n.startswith("memory_")}
    # A head's other inputs (AprilLab's reference_map_range) come from the head itself.
    pool = {**getattr(head, "example_inputs", dict)(), **encoded, **text, **memory}
    return {n: pool[n] for n in head.input_names()}


# ------------------------------------------------------------------------------- parity check
def check_parity(root: Path, files: dict[str, str], built: Built, text: dict[str, torch.Tensor],
                 probe: Probe) -> dict:
    """Run onnxruntime and the method's torch modules on the probe's images (with the
    references' encoder outputs export_graphs computed as few-shot memory); max |difference|
    per graph. ``text``: the head's
    text inputs by name (a category's, or ``example_text``)."""
    import onnxruntime as ort

    encoder, heads = built.encoder, built.heads
    names = encoder.output_names()

    def session(name):
        return ort.InferenceSession(str(root / files[name]), providers=["CPUExecutionProvider"])

    with torch.no_grad():
        torch_out = dict(zip(names, encoder(probe.images)))
        torch_ref = probe.reference_outputs or dict(zip(names, encoder(probe.references)))
    ort_out = dict(zip(names, session("encoder").run(None, {"images": probe.images.numpy()})))
    result = {"encoder": max(max_abs_diff(ort_out[n], torch_out[n].numpy()) for n in names)}
    if FUSED_ENCODER in files:
        fused = dict(zip(names, session(FUSED_ENCODER).run(None, {"images": probe.images.numpy()})))
        result[FUSED_ENCODER] = max(max_abs_diff(fused[n], torch_out[n].numpy()) for n in names)
    memory = {f"memory_{n}": torch_ref[n].flatten(0, 1) for n in names}
    for name, head in heads.items():
        inputs = head_example_inputs(head, torch_out, text, memory)
        with torch.no_grad():
            expected = [t.numpy() for t in head(*inputs.values())]
        got = session(name).run(None, {k: v.numpy() for k, v in inputs.items()})
        result[name] = max(max_abs_diff(g, e) for g, e in zip(got, expected))
    return result


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; infinity where either side is not finite (a NaN must fail the check)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max())


def judge_parity(parity: dict[str, float], tolerance: float, strict: bool, images: int
                 ) -> dict:
    """The manifest's parity record of the differences measured on ``images`` images; raises
    when they exceed the tolerance and ``strict``."""
    worst = max(parity.values())
    passed = bool(np.isfinite(worst)) and worst <= tolerance
    log("      max |onnxruntime - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in
                                                         parity.items()))
    if not passed and strict:
        raise ExportError(f"exported graphs differ from PyTorch by {worst:.3e} > {tolerance:g} "
                          "(FP32); pass --no-strict-parity to keep them anyway")
    return {"max_abs_diff": parity, "tolerance": tolerance, "passed": passed,
            "images": images, "reference": "the torch modules the graphs were traced from"}

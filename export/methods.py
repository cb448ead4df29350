"""Scoring methods the exporter can build, keyed by the name stored in the manifest.

Each entry says how to build the encoder module (``output_names()``, traced into
``fp32/encoder.onnx``) and the scoring heads (``input_names()``, traced into
``fp32/head_zeroshot.onnx`` / ``head_fewshot.onnx``) from the CLIP vision tower, and which
options it takes. Exporting, the parity check and the manifest are the same for every method;
the runtime's counterpart is ``clipinspect.runtime.methods``. Adding a method is one entry here,
its torch module, and one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .patch_torch import PatchEncoder, PatchHead
from .winclip_torch import Adaptation, WinClipEncoder, WinClipHead


@dataclass(frozen=True)
class ExportMethod:
    """encoder(visual, **options) -> encoder module; head(encoder, few_shot, adaptation) ->
    head module. ``defaults``: the method's options and their default values."""

    name: str
    encoder: Callable[..., nn.Module]
    head: Callable[[nn.Module, bool, Adaptation | None], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, ExportMethod] = {
    "winclip": ExportMethod(
        "winclip",
        encoder=lambda visual, scales: WinClipEncoder(visual, tuple(scales)),
        head=lambda enc, few_shot, adaptation: WinClipHead(enc.grid, enc.scales, few_shot,
                                                           adaptation),
        defaults={"scales": (2, 3)}),
    "patch": ExportMethod(
        "patch",
        encoder=lambda visual, dense_blocks: PatchEncoder(visual, dense_blocks),
        head=lambda enc, few_shot, adaptation: PatchHead(enc.grid, few_shot, adaptation),
        defaults={"dense_blocks": 1}),
}


def method_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's options: its defaults updated with the ``given`` ones (None = default);
    an option the method does not take is an error rather than silently ignored."""
    spec = METHODS[method]
    unknown = [k for k, v in given.items() if v is not None and k not in spec.defaults]
    if unknown:
        raise ValueError(f"--{unknown[0].replace('_', '-')} does not apply to method {method!r} "
                         f"(its options: {', '.join(spec.defaults) or 'none'})")
    return {k: (given[k] if given.get(k) is not None else v) for k, v in spec.defaults.items()}

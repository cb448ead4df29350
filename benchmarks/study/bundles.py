"""A study variant's bundle: exported once into a cache keyed by what determines it
(``spec.bundle_key``), quantized there with calibration's own code when the variant asks for
FP16 or INT8. Export needs torch; it is imported only when a bundle is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from clipinspect.runtime import Bundle
from clipinspect.runtime.core.bundle import atomic_write_bytes

from .spec import Variant, bundle_key


def export_options(variant: Variant, categories: Sequence[str], out: Path):
    """The ``ExportOptions`` that make the variant's FP32 bundle."""
    from clipinspect.export.exporter import ExportOptions
    from clipinspect.export.methods import Adaptation

    method_options = dict(variant.options)
    if variant.adapters is not None:
        method_options["adapters"] = variant.adapters
    return ExportOptions(
        out=out, model=variant.model,
        pretrained=None if variant.pretrained == "none" else variant.pretrained,
        categories=list(categories), method=variant.method, method_options=method_options,
        adaptation=Adaptation() if variant.adapt else None, prompts=variant.prompt_file,
        ensemble=variant.prompt_source != "llm", seed=variant.seed, overwrite=True,
        warn_random=False)


def ensure_bundle(variant: Variant, categories: Sequence[str], work: Path, data: Path) -> Path:
    """The variant's bundle under ``work``/bundles, exported if missing and with the variant's
    precision added (INT8 calibrated on the normal training images of ``data``)."""
    key = bundle_key(variant, categories)
    path = work / "bundles" / key
    if not (path / "manifest.json").is_file():
        from clipinspect.export.exporter import export_bundle

        export_bundle(export_options(variant, categories, path))
        atomic_write_bytes(path.parent / f"{key}.json", (json.dumps(
            {"variant": variant.to_dict(), "categories": list(categories)}, indent=1) + "\n"
        ).encode())
    if variant.precision != "fp32":
        _quantized(path, variant.precision, data)
    return path


def _quantized(path: Path, precision: str, data: Path) -> None:
    """Add ``precision`` graphs unless they are there, calibrated on the same images."""
    from clipinspect.calibration.quantize import quantize_bundle

    bundle = Bundle.open(path)
    record = bundle.manifest.quantization.get(precision)
    source = str(data.resolve()) if precision == "int8" else "synthetic probe images"
    if record is not None and record.agreement.source == source:
        return
    quantize_bundle(path, precision, data if precision == "int8" else None,
                    overwrite=record is not None)


def adapters_seen(variant: Variant, bundle: Bundle) -> tuple[list[str] | None, str]:
    """(categories the variant's adapters were trained on, where that comes from). None when
    the variant has no trained adapters; [] for random ones."""
    section = bundle.manifest.section
    recorded = section.adapters_categories()
    declared = None if variant.adapters_categories is None else list(variant.adapters_categories)
    if declared is not None and recorded is not None and sorted(declared) != sorted(recorded):
        raise ValueError(f"variant {variant.name!r}: adapters_categories {declared} differ from "
                         f"the categories its checkpoint records, {recorded}; fix the study file")
    if recorded is not None:
        return list(recorded), "recorded in the checkpoint"
    if declared is not None:
        return declared, "declared in the study"
    if section.adapters_kind() == "random":
        return [], "random projections (never trained)"
    if variant.adapters not in (None, "none"):
        return None, "not recorded: add adapters_categories to the variant"
    return None, ""

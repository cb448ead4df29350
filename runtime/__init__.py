"""clipinspect runtime: run exported bundles (any scoring method) with numpy + onnxruntime
(never torch).

    from clipinspect.runtime import Inspector
    inspector = Inspector.open("bundle", precision="fp32", provider="cpu")
    results = inspector.inspect(["part.png"], category="bottle")
    results[0].image_score, results[0].anomaly_map
"""

# Methods and backends register themselves with core (core.registry) when imported: core never
# imports the floors above it.
from . import methods, tensorrt  # noqa: F401
from .core.bundle import Bundle, BundleError
from .core.images import ImageError
from .core.inspector import InspectionResult, Inspector
from .core.backends import ProviderError, available_providers

__all__ = ["Bundle", "BundleError", "ImageError", "InspectionResult", "Inspector",
           "ProviderError", "available_providers"]

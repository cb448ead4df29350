"""clipinspect runtime: run WinCLIP bundles with numpy + onnxruntime (never torch).

    from clipinspect.runtime import Inspector
    inspector = Inspector.open("bundle", precision="fp32", provider="cpu")
    results = inspector.inspect(["part.png"], category="bottle")
    results[0].image_score, results[0].anomaly_map
"""

from .bundle import Bundle, BundleError
from .images import ImageError
from .inspector import InspectionResult, Inspector
from .backends import ProviderError, available_providers

__all__ = ["Bundle", "BundleError", "ImageError", "InspectionResult", "Inspector",
           "ProviderError", "available_providers"]

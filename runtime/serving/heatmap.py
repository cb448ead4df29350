"""Heat maps as PNG for HTTP answers and the live page (colours as in ``predict``)."""

from __future__ import annotations

import base64
import io

from PIL import Image

from ..core.inspector import InspectionResult
from ..core.maps import scaled_overlay


def overlay_png(result: InspectionResult, thresholds: dict, max_side: int | None = None) -> str:
    """Base64 PNG of the heat map over the image, at most ``max_side`` pixels on the longest
    side when given."""
    image = Image.fromarray(scaled_overlay(result.image, result.anomaly_map, thresholds,
                                           result.mask))
    if max_side is not None:
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

"""ALFA-style preset bundles: the patch method's graphs (with contextual prompt adaptation in
its heads), so its encoder outputs and cost model are the patch method's."""

from __future__ import annotations

from . import patch
from .base import Method

METHOD = Method("alfa", "ALFA-style preset: the patch aligner with an LLM-written prompt file "
                        "and contextual prompt adaptation", patch.outputs, patch.gflops)

"""ALFA-style preset bundles: the patch method's graphs (with contextual prompt adaptation in
its heads), so its manifest section, encoder outputs and cost model are the patch method's."""

from __future__ import annotations

from dataclasses import replace

from . import patch

METHOD = replace(patch.METHOD, name="alfa", summary="ALFA-style preset: the patch aligner with "
                 "an LLM-written prompt file and contextual prompt adaptation")

"""ALFA-style preset (docs/methods.md#alfa-style-preset-our-formulation): the patch-only
fine-grained aligner, an LLM-written prompt file and contextual prompt adaptation in one
``--method`` value.

Nothing is computed here that patch.py and common.py do not already compute: the encoder, the
heads and the eager reference are the patch method's, run with contextual adaptation always on
(``Adaptation()``'s defaults unless ``--adapt`` sets tau and top-k). What the preset adds is the
requirement: every category needs descriptions from a prompt file (``clipinspect prompts
generate`` writes one with an LLM), refused before CLIP is loaded when missing.
"""

from __future__ import annotations

from .base import Built, Clip, ExportMethod
from .common import Adaptation
from .patch import METHOD as PATCH
from .patch import PatchReference
from .patch import build as build_patch
from .winclip import category_text as winclip_text

NAME = "alfa"


def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    return build_patch(clip, options, adaptation or Adaptation())


def category_text(model, tokenizer, category: str, ensemble: dict,
                  descriptions: dict[str, list[str]] | None = None,
                  adaptation: dict | None = None) -> tuple[dict, dict]:
    """The patch method's text (WinCLIP's ensemble, the file's descriptions, ambiguity filter,
    prompt pools), refused for a category the prompt file does not describe."""
    if not descriptions or not any(descriptions.get(s) for s in ("normal", "anomalous")):
        raise ValueError(f"category {category!r} has no descriptions in the prompt file. "
                         + METHOD.missing_prompts([category]))
    return winclip_text(model, tokenizer, category, ensemble, descriptions, adaptation)


METHOD = ExportMethod(
    name=NAME,
    summary="ALFA-style preset, the patch aligner with an LLM-written prompt file (--prompts, "
            "required) and contextual prompt adaptation (always on)",
    options=PATCH.options, build=build, category_text=category_text, reference=PatchReference,
    needs_prompt_file=True)

"""What a scoring method is on the torch side, as the export skeleton sees it (no math here).

A method module (winclip.py, patch.py, aprillab.py, alfa.py) defines one ``ExportMethod``: its options
(command-line flag, default, help), how to build the encoder and the two scoring heads from a
loaded CLIP, its text recipe, and its eager reference. ``methods/__init__.py`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from clipinspect.runtime.core.manifest import Adaptation as ManifestAdaptation
from clipinspect.runtime.core.names import HEADS
from .common import Adaptation


@dataclass(frozen=True)
class Option:
    """One option of a method: ``name`` is its key in the manifest's ``method_options`` and in
    ``ExportOptions.method_options``; on the command line it is ``--name-with-dashes``, parsed
    by ``type``. The default applies when the option is not given (None)."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Clip:
    """A loaded open_clip model as the methods need it (``exporter.load_clip``)."""

    name: str
    model: nn.Module
    tokenizer: Callable
    weights: dict
    seed: int = 0


@dataclass
class Built:
    """encoder: images -> ``output_names()``; heads: ``head_zeroshot`` and ``head_fewshot``
    (``input_names()``); section: the method's typed manifest section (its runtime module's
    section class); adaptation and temperature: the manifest's scoring entries of the methods
    scored against (adapted) text prototypes (None for the others)."""

    encoder: nn.Module
    heads: dict[str, nn.Module]
    section: Any
    adaptation: ManifestAdaptation | None = None
    temperature: float | None = None


def _no_check(options: dict[str, Any]) -> None:
    return None


def _as_loaded(model: nn.Module, manifest: Any) -> None:
    return None


@dataclass(frozen=True)
class ExportMethod:
    """A scoring method, torch side.

    build(clip, options, adaptation) -> Built; ValueError for options the model cannot take.
    category_text(model, tokenizer, name, ensemble, descriptions, adaptation) -> (arrays of
    ``text.npz``, prompt record); ``ensemble`` names its prompt ensemble (export/prompts/).
    reference: the eager reference class, ``reference.from_manifest(model, bundle.manifest)`` (the typed Manifest).
    prompt_adaptation: whether it takes contextual adaptation and prompt files (--adapt,
    --prompts); needs_prompt_file: whether every category must have descriptions in a prompt
    file. check(options): refuses options before CLIP is loaded (ValueError).
    text_tower(model, manifest): makes a loaded CLIP run its text tower as the bundle's export
    did (add-category; AprilLab sets the recorded activation), default: as loaded.
    """

    name: str
    summary: str
    options: tuple[Option, ...]
    build: Callable[[Clip, dict[str, Any], Adaptation | None], Built]
    category_text: Callable[..., tuple[dict, dict]]
    reference: type
    ensemble: str = "winclip"
    prompt_adaptation: bool = True
    check: Callable[[dict[str, Any]], None] = field(default=_no_check)
    needs_prompt_file: bool = False
    text_tower: Callable[[nn.Module, Any], None] = field(default=_as_loaded)

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def missing_prompts(self, categories: Sequence[str]) -> str:
        """What to run to get the prompt file a ``needs_prompt_file`` method wants."""
        names = " ".join(categories) or "NAME ..."
        return (f"--method {self.name} needs descriptions of {names} from a prompt file: run "
                f"'clipinspect prompts generate --url URL --model MODEL --categories {names} "
                "--out prompts.json' (an LLM behind an OpenAI-compatible endpoint writes them), "
                "review the file, then pass --prompts prompts.json")

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """The method's options: defaults updated with the ``given`` ones (None = default)."""
        return {k: (given[k] if given.get(k) is not None else v) for k, v in self.defaults.items()}

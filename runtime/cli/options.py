"""Argument types and the option groups every ``clipinspect`` command shares.

Defined once here, so ``--batch-size`` or ``--mode`` mean and check the same thing in every
command, whichever subpackage contributes it (export, calibration and benchmarks import these;
this module imports nothing heavy). Each ``add_*`` adds one option to a parser and takes the
few things commands legitimately differ in (default, help, choices) as keywords.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from ..core.errors import did_you_mean
# Re-exported: the commands import the choices with the options that take them.
from ..core.names import (ATTENTION_CHOICES, MODES, ORT_PROVIDERS, PRECISIONS, PROVIDERS,
                          TENSORRT_NATIVE)

# Dataset layouts of --format ("auto": told apart by their folders). The last two are
# calibration.datasets.FORMATS, which this module must not import (a test checks they agree).
DATASET_FORMATS = ("auto", "mvtec", "visa")


# ------------------------------------------------------------------------------------ types
def csv_list(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(minimum: int, example: str):
    """argparse type for comma-separated whole numbers >= minimum (e.g. scales, shot counts)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in csv_list(text)]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers "
                                             f">= {minimum}, e.g. {example}")
        return values
    return parse


def whole_number(minimum: int):
    """argparse type for one whole number >= minimum; its ``minimum`` attribute says the bound
    (tests check that every whole-number option has one)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {minimum}")
        return value
    parse.minimum = minimum  # type: ignore[attr-defined]
    parse.__name__ = f"whole_number_{minimum}"
    return parse


positive_int = whole_number(1)  # counts, sizes, batch sizes, threads
non_negative_int = whole_number(0)  # seeds, and counts where 0 means "none" (epochs, warm-ups)


# ---------------------------------------------------------------------------- option groups
def add_bundle(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """The positional bundle directory."""
    p.add_argument("bundle", help=help)


def add_category(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", required=True)


class CategoryNames(argparse.Action):
    """``--categories NAME,NAME``: names separated by commas (a name may hold spaces, never a
    comma); repeated flags add up. ``words=True``: the old form of the export commands, names as
    separate words (``--categories a b``), still parses, with a one-line warning."""

    def __init__(self, option_strings, dest, words: bool = False, **kwargs):
        super().__init__(option_strings, dest, nargs="+" if words else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        given = values if isinstance(values, list) else [values]
        names = [n for v in given for n in csv_list(v)]
        if len(given) > 1:
            print(f"clipinspect: warning: {option_string} {' '.join(map(shlex.quote, given))}: "
                  "names as separate words are deprecated, separate them with commas: "
                  f"{option_string} {shlex.quote(','.join(names))}", file=sys.stderr)
        setattr(namespace, self.dest, list(getattr(namespace, self.dest) or []) + names)


def add_categories(p: argparse.ArgumentParser, help: str, *, required: bool = False,
                   words: bool = False) -> None:
    """``--categories a,b`` (a list, ``[]`` when not given). ``words``: also the deprecated
    ``--categories a b``, for the commands that took it."""
    p.add_argument("--categories", action=CategoryNames, words=words, default=[],
                   required=required, metavar="NAME,...",
                   help=f"{help}; comma-separated, quoted when a name holds a space: "
                        "\"bottle,metal nut\"")


def add_dataset_format(p: argparse.ArgumentParser) -> None:
    """``--format``: the layout of a dataset root."""
    p.add_argument("--format", default="auto", choices=list(DATASET_FORMATS),
                   type=one_of(DATASET_FORMATS),
                   help="dataset layout: mvtec, visa, or auto (default: told apart by its folders)")


def one_of(choices: Sequence[str]):
    """An argparse ``type`` for a choice option: a value that differs from a choice only in case,
    or is a close misspelling of one, is refused naming the choice (argparse itself would only
    list them all)."""
    def check(value: str) -> str:
        if value not in choices and (hint := did_you_mean(value, choices)):
            raise argparse.ArgumentTypeError(f"invalid choice {value!r}{hint}")
        return value
    return check


def add_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="auto", choices=list(MODES), type=one_of(MODES))


def add_precision(p: argparse.ArgumentParser, *, default: str | None = "fp32",
                  choices: Sequence[str] | None = None, help: str | None = None) -> None:
    """``--precision``; ``default=None`` makes it required."""
    p.add_argument("--precision", default=default, required=default is None,
                   choices=list(choices) if choices else None,
                   type=one_of(choices) if choices else str, help=help)


def add_provider(p: argparse.ArgumentParser, *, choices: Sequence[str] = PROVIDERS) -> None:
    help = ("onnxruntime execution provider (default cpu), or tensorrt-native: the engines of "
            "'clipinspect build-engine' without onnxruntime" if TENSORRT_NATIVE in choices
            else None)
    p.add_argument("--provider", default="cpu", choices=list(choices), type=one_of(choices),
                   help=help)


def add_batch_size(p: argparse.ArgumentParser, *, default: int = 8,
                   help: str | None = None) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, help=help)


def add_threads(p: argparse.ArgumentParser, *, help: str | None = None) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help=help or "onnxruntime intra-op threads (default: one per physical core)")


class MaxMegapixels(argparse.Action):
    """--max-megapixels: sets the one pixel limit of every decode in this process."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ..core.images import ImageError, set_max_megapixels
        try:
            set_max_megapixels(float(values))
        except (ValueError, ImageError):
            parser.error(f"{option_string} {values!r}: expected a number of megapixels > 0")
        setattr(namespace, self.dest, float(values))


class JpegDraft(argparse.Action):
    """--jpeg-draft: reduced JPEG decoding for the model's input in this process."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..core.images import set_jpeg_draft
        set_jpeg_draft(True)
        setattr(namespace, self.dest, True)


def add_max_megapixels(p: argparse.ArgumentParser) -> None:
    """The decoding options: the pixel limit and reduced JPEG decoding."""
    p.add_argument("--max-megapixels", action=MaxMegapixels, default=None, metavar="MP",
                   help="largest image decoded, width x height in megapixels (default 40, or "
                        "$CLIPINSPECT_MAX_MEGAPIXELS); larger JPEGs are decoded reduced, other "
                        "formats refused")
    p.add_argument("--jpeg-draft", action=JpegDraft, default=False,
                   help="decode large JPEGs reduced (DCT scaling) to what the model needs: less "
                        "time and memory, model input slightly different from decode-then-resize "
                        "(default off, or $CLIPINSPECT_JPEG_DRAFT=1)")


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """How a command runs the bundle: precision, provider, batch size, threads, pixel limit."""
    add_precision(p, help="graph precision: fp32 (default), or fp16 / int8 after 'clipinspect "
                          "quantize'")
    add_provider(p)
    add_attention(p)
    add_batch_size(p, help="images per inference batch")
    add_threads(p)
    add_max_megapixels(p)


def add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attention", default="auto", choices=list(ATTENTION_CHOICES),
                   type=one_of(ATTENTION_CHOICES),
                   help="encoder graph onnxruntime runs: auto (default: the fused-attention "
                        "encoder on the CPU provider where the bundle has one, else the "
                        "standard one), fused, or standard")


def deprecated_alias(new: str):
    """argparse action for an old spelling of ``new``: stores the value where ``new`` does and
    tells the user, on stderr, which spelling to use from now on."""
    class DeprecatedAlias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"clipinspect: warning: {option_string} is deprecated, use {new} (same "
                  "values)", file=sys.stderr)
            setattr(namespace, self.dest, values)
    return DeprecatedAlias

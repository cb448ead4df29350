"""``clipinspect export``, ``train-adapters``, ``add-category``, ``prompts`` and ``demo``.

Registering imports nothing heavy: the scoring methods' options (``--method`` and each method's
own flags) come from the method registry, which imports torch, so they are added to the parser
of ``export`` (and ``train-adapters``) only when that command is parsed or its help shown.

Category names are given as everywhere in ``clipinspect``: ``--categories a,b`` (names hold no
commas); the old ``--categories a b`` still parses here, with a warning. ``add-category`` also
still takes them positionally, as it always did.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from clipinspect.runtime.cli.options import (add_categories, add_dataset_format, csv_list,
                                             non_negative_int, positive_int, whole_number)
from clipinspect.runtime.core.errors import ClipInspectError, UsageError

from .defaults import (ADAPTER_MODEL, ADAPTER_PRETRAINED, DEFAULT_MODEL, DEFAULT_PRETRAINED,
                       FUSED_ATTENTION, PARITY_IMAGES, PARITY_TOLERANCE)
from .demo_defaults import DEMO_MODEL, DEMO_PRETRAINED
from .training_recipes import DEFAULT_RECIPE, MASK_RULES, RECIPES

DEFAULT_TAU_CTX = 0.01  # the default of methods.common.Adaptation; not imported: that needs torch
EXPORT_EXTRA = "pip install 'clipinspect[export]'"


class MissingExtra(ClipInspectError):
    pass


def _exporter():
    try:
        from . import exporter
    except ImportError as e:
        raise MissingExtra(f"this command needs the export extra ({e.name or e} is not installed): "
                           f"{EXPORT_EXTRA}") from e
    return exporter


def add_categories_option(p: argparse.ArgumentParser, help: str, required: bool = False) -> None:
    """These commands took ``--categories a b``: still parsed, with a warning."""
    add_categories(p, help, required=required, words=True)


def add_model_options(p: argparse.ArgumentParser, model: str, pretrained: str,
                      pretrained_help: str | None = None) -> None:
    p.add_argument("--model", default=model, help=f"open_clip model (default {model})")
    p.add_argument("--pretrained", default=pretrained,
                   help=pretrained_help or f"open_clip tag, local checkpoint file, or 'none' "
                                           f"(random init, for tests; default {pretrained})")


class LazyOptionsParser(argparse.ArgumentParser):
    """A subcommand's parser that gets some of its options (``add_lazily``) the first time it
    parses or prints help: those come from the method modules, which import torch."""

    add_lazily: Callable[[argparse.ArgumentParser], None] | None = None

    def _complete(self) -> None:
        add, self.add_lazily = self.add_lazily, None
        if add is not None:
            try:
                add(self)
            except ImportError as e:
                self.error(f"this command needs the export extra ({e.name or e} is not "
                           f"installed): {EXPORT_EXTRA}")

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._complete()
        return super().format_help()


def lazy_options(p: argparse.ArgumentParser, add: Callable[[argparse.ArgumentParser], None]
                 ) -> None:
    # The subparsers action builds every parser with one class; this one only defers options.
    p.__class__ = LazyOptionsParser
    p.add_lazily = add


def add_method_options(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Each method's own options from the registry, grouped per method (``names``: only those)."""
    from .methods import METHODS

    seen: set[str] = set()  # a preset shares its base method's options: one flag each
    for method in METHODS.values():
        options = [o for o in method.options
                   if (names is None or o.name in names) and o.name not in seen]
        seen |= {o.name for o in options}
        if not options:
            continue
        group = p.add_argument_group(f"{method.name} options", method.summary)
        for o in options:
            group.add_argument(o.flag, type=o.type, default=None, metavar=o.metavar, help=o.help)


def add_export_method_options(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS

    p.add_argument("--method", default="winclip", choices=list(METHODS),
                   help="scoring method: " + "; ".join(f"{m.name}: {m.summary}"
                                                       for m in METHODS.values()))
    add_method_options(p)


def cmd_export(args: argparse.Namespace) -> int:
    ex = _exporter()
    from .methods import METHODS, Adaptation

    adaptation = None
    if args.adapt:
        adaptation = Adaptation(tau=args.tau_ctx, top_k=args.top_k)
    elif args.top_k is not None or args.tau_ctx != DEFAULT_TAU_CTX:
        raise ex.ExportError("--tau-ctx and --top-k set the prompt adaptation: add --adapt")
    given = {o.name: getattr(args, o.name) for m in METHODS.values() for o in m.options}
    ex.export_bundle(ex.ExportOptions(
        out=args.out, model=args.model, pretrained=args.pretrained, categories=args.categories,
        method=args.method, method_options=given, adaptation=adaptation, prompts=args.prompts,
        ensemble=not args.no_ensemble, opset=args.opset,
        tolerance=PARITY_TOLERANCE if args.tolerance is None else args.tolerance,
        strict=not args.no_strict_parity, parity_images=args.parity_images,
        fused_attention=args.fused_attention, overwrite=args.overwrite, seed=args.seed))
    return 0


def cmd_add_category(args: argparse.Namespace) -> int:
    ex = _exporter()  # first: without torch nothing else matters
    names = [n for v in args.names for n in csv_list(v)] + args.categories
    if not names:
        raise UsageError("name at least one category: add-category BUNDLE --categories NAME ...")
    ex.add_categories(args.bundle, names, args.pretrained, replace=args.replace,
                      prompts=args.prompts)
    print(f"added {', '.join(names)} to {args.bundle}")
    return 0


def cmd_train_adapters(args: argparse.Namespace) -> int:
    _exporter()  # the same extra
    from .train_adapters import TrainOptions, train_adapters
    meta = train_adapters(TrainOptions(
        data=args.data, out=args.out, model=args.model, pretrained=args.pretrained,
        layers=args.layers, image_size=args.image_size, activation=args.activation,
        categories=args.categories or None,
        fmt=args.format, split=args.split, recipe=args.recipe, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, mosaic=args.mosaic,
        mask_resize=args.mask_resize, seed=args.seed, cache=args.cache, resume=args.resume,
        overwrite=args.overwrite))
    print(f"projections after {meta['epochs']} epochs written to {args.out}; loss per epoch "
          f"{meta['loss_per_epoch']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import DemoOptions, run_demo
    except ImportError as e:
        raise MissingExtra(f"the demo needs the export extra ({e.name or e} is not installed): "
                           "pip install 'clipinspect[export,cpu]'") from e
    run_demo(DemoOptions(out=args.out, model=args.model, pretrained=args.pretrained,
                         shots=args.shots, categories=args.categories or None, seed=args.seed,
                         batch_size=args.batch_size, overwrite=args.overwrite))
    return 0


def cmd_prompts_check(args: argparse.Namespace) -> int:
    from .prompt_format import load

    entries = load(args.file)
    for name, entry in entries.items():
        print(f"{name}: {len(entry['normal'])} normal, {len(entry['anomalous'])} anomalous")
    print(f"{args.file}: valid prompt file, {len(entries)} categor{'y' if len(entries) == 1 else 'ies'}")
    return 0


def cmd_prompts_generate(args: argparse.Namespace) -> int:
    from .llm_client import generate

    categories = args.categories
    if not categories:
        raise UsageError("--categories is empty: name at least one category")
    generate(args.url, args.model, categories, args.out, per_state=args.per_state,
             api_key_env=args.api_key_env, timeout=args.timeout, temperature=args.temperature,
             progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {args.out} ({len(categories)} categor{'y' if len(categories) == 1 else 'ies'}); "
          "review it, then pass it to 'clipinspect export --prompts'")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _register_export(sub)
    _register_train_adapters(sub)
    _register_add_category(sub)
    _register_prompts(sub)
    _register_demo(sub)


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an open_clip CLIP into a bundle (torch)")
    add_model_options(p, DEFAULT_MODEL, DEFAULT_PRETRAINED)
    add_categories_option(p, "category names")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--adapt", action="store_true",
                   help="per-image contextual prompt adaptation in the scoring graph, with the "
                        "ambiguity filter at export")
    p.add_argument("--tau-ctx", type=float, default=DEFAULT_TAU_CTX,
                   help=f"--adapt: temperature of the prompt weights (default {DEFAULT_TAU_CTX:g})")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="--adapt: weight only the k most relevant prompts per state (default all)")
    p.add_argument("--prompts", default=None,
                   help="prompt file (JSON or YAML) whose descriptions join the prompt ensemble")
    p.add_argument("--no-ensemble", action="store_true",
                   help="with --prompts: the file's descriptions alone, without the compositional "
                        "ensemble (e.g. LLM-written prompts on their own)")
    p.add_argument("--opset", type=whole_number(17), default=17, help="ONNX opset (>= 17)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"largest |onnxruntime - torch| accepted (FP32), default "
                        f"{PARITY_TOLERANCE:g}")
    p.add_argument("--no-strict-parity", action="store_true",
                   help="keep the bundle even if the parity check fails (it is recorded)")
    p.add_argument("--parity-images", type=positive_int, default=PARITY_IMAGES,
                   help=f"unseen random images the parity check runs (default {PARITY_IMAGES}; "
                        "each is one eager PyTorch pass, the slow part of exporting a large "
                        "model)")
    p.add_argument("--fused-attention", action=argparse.BooleanOptionalAction,
                   default=FUSED_ATTENTION,
                   help="also write the onnxruntime-only encoder with attention as onnxruntime's "
                        "fused operator, which the CPU provider then runs (INT8 after quantize: "
                        "a few percent faster on the CPU, one more encoder file; default off)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random init with 'none'")
    lazy_options(p, add_export_method_options)
    p.set_defaults(func=cmd_export)


def _register_train_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-adapters",
                       help="train AprilLab's per-level projections on an annotated dataset (torch)")
    p.add_argument("data", help="dataset root, MVTec AD or VisA layout, with masks")
    p.add_argument("--out", required=True, help="checkpoint file to write (after every epoch)")
    add_model_options(p, ADAPTER_MODEL, ADAPTER_PRETRAINED)
    add_categories_option(p, "categories (default all)")
    add_dataset_format(p)
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="split with annotated defects (default test, as APRIL-GAN)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                   help="training recipe (the flags below override its values): "
                        + "; ".join(f"{r.name}: {r.about}" for r in RECIPES.values()))
    p.add_argument("--epochs", type=non_negative_int, default=None,
                   help="epochs (default: the recipe's); 0 writes the untrained projections")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="default: the recipe's (8)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, betas 0.5, 0.999 (default: the recipe's, 1e-3)")
    p.add_argument("--mosaic", type=float, default=None, metavar="P",
                   help="probability that a sample is replaced by a 2x2 mosaic of four images "
                        "of its category (default: the recipe's)")
    p.add_argument("--mask-resize", default=None, choices=MASK_RULES,
                   help="masks to the input size: nearest, or bilinear then > 0.5 "
                        "(default: the recipe's)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="projection init and shuffling")
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default: <out>.features next to the checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing --out")
    lazy_options(p, lambda q: add_method_options(q, ("layers", "image_size", "activation")))
    p.set_defaults(func=cmd_train_adapters)


def _register_add_category(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("add-category", help="add categories' text embeddings to a bundle (needs the "
                       "export extra: torch, open_clip)")
    p.add_argument("bundle")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="category names, as before --categories (still accepted)")
    add_categories_option(p, "category names as they should appear in prompts")
    p.add_argument("--pretrained", default=None,
                   help="where the export's weights are now, if the recorded path moved")
    p.add_argument("--replace", action="store_true", help="recompute an existing category")
    p.add_argument("--prompts", default=None,
                   help="prompt file (JSON or YAML) whose descriptions join the prompt ensemble")
    p.set_defaults(func=cmd_add_category)


def _register_prompts(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="prompt files: check one, or generate one with an LLM")
    psub = p.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)
    q = psub.add_parser("check", help="validate a prompt file and count its descriptions")
    q.add_argument("file")
    q.set_defaults(func=cmd_prompts_check)
    q = psub.add_parser("generate", help="ask an OpenAI-compatible chat endpoint for descriptions")
    q.add_argument("--url", required=True,
                   help="base URL (e.g. https://api.openai.com/v1) or full chat-completions URL")
    q.add_argument("--model", required=True, help="model name the endpoint knows")
    add_categories_option(q, "category names", required=True)
    q.add_argument("--out", required=True, help="prompt file to write (JSON)")
    q.add_argument("--per-state", type=positive_int, default=10,
                   help="descriptions asked for per state and category (default 10)")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    q.add_argument("--timeout", type=float, default=60.0,
                   help="seconds for each whole request: lookup, connection, headers and body "
                        "(default 60)")
    q.add_argument("--temperature", type=float, default=0.7)
    q.set_defaults(func=cmd_prompts_generate)


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> export -> few-shot -> inspect -> report")
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of an existing --out (its bundle is reused when "
                   "it has the same model, weights and categories)")
    add_model_options(p, DEMO_MODEL, DEMO_PRETRAINED,
                      f"weights tag or checkpoint file, tried first (default {DEMO_PRETRAINED}); "
                      "random weights, reported once, if it cannot be loaded")
    add_categories_option(p, "synthetic categories (default: two of them)")
    p.add_argument("--shots", type=positive_int, default=4,
                   help="few-shot reference images per category (default 4)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per inference batch (default 4)")
    p.set_defaults(func=cmd_demo)

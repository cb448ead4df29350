"""``clipinspect export``, ``add-category``, ``prompts`` and ``demo``. Registering imports
nothing heavy; torch and open_clip are imported only when export, add-category or demo runs."""

from __future__ import annotations

import argparse

from clipinspect.runtime.cli import csv_list, int_list
from clipinspect.runtime.core.errors import ClipInspectError, UsageError

DEFAULT_TAU_CTX = 0.01  # the default of winclip_torch.Adaptation; not imported: that needs torch


class MissingExtra(ClipInspectError):
    pass


def _exporter():
    try:
        from . import exporter
    except ImportError as e:
        raise MissingExtra(f"this command needs the export extra ({e.name or e} is not installed): "
                           "pip install 'clipinspect[export]'") from e
    return exporter


def cmd_export(args: argparse.Namespace) -> int:
    ex = _exporter()
    adaptation = None
    if args.adapt:
        from .winclip_torch import Adaptation
        adaptation = Adaptation(tau=args.tau_ctx, top_k=args.top_k)
    elif args.top_k is not None or args.tau_ctx != DEFAULT_TAU_CTX:
        raise ex.ExportError("--tau-ctx and --top-k set the prompt adaptation: add --adapt")
    given = [f"--{n.replace('_', '-')}" for n in ("adapters", "layers", "image_size")
             if getattr(args, n) is not None]
    if args.method != "aprillab" and given:
        raise ex.ExportError(f"{', '.join(given)} apply to --method aprillab only")
    if args.method == "aprillab":
        other = [flag for flag, value in (("--scales", args.scales),
                                          ("--dense-blocks", args.dense_blocks),
                                          ("--adapt", adaptation), ("--prompts", args.prompts))
                 if value is not None]
        if other:
            raise ex.ExportError(f"{', '.join(other)} do not apply to --method aprillab (it uses "
                                 "its own prompt recipe and projections)")
        from .aprillab import export_aprillab_bundle
        export_aprillab_bundle(args.out, args.model, args.pretrained, csv_list(args.categories),
                               adapters=args.adapters, layers=args.layers,
                               image_size=args.image_size, opset=args.opset,
                               tolerance=(ex.PARITY_TOLERANCE if args.tolerance is None
                                          else args.tolerance),
                               strict=not args.no_strict_parity, overwrite=args.overwrite,
                               seed=args.seed)
        return 0
    ex.export_bundle(args.out, args.model, args.pretrained, csv_list(args.categories),
                     scales=args.scales, opset=args.opset,
                     tolerance=ex.PARITY_TOLERANCE if args.tolerance is None else args.tolerance,
                     strict=not args.no_strict_parity,
                     overwrite=args.overwrite, seed=args.seed, method=args.method,
                     options={"dense_blocks": args.dense_blocks}, adaptation=adaptation,
                     prompts=args.prompts)
    return 0


def cmd_add_category(args: argparse.Namespace) -> int:
    ex = _exporter()
    ex.add_categories(args.bundle, args.names, args.pretrained, replace=args.replace,
                      prompts=args.prompts)
    print(f"added {', '.join(args.names)} to {args.bundle}")
    return 0


def cmd_train_adapters(args: argparse.Namespace) -> int:
    _exporter()  # the same extra
    from .train_adapters import train_adapters
    meta = train_adapters(args.data, args.out, args.model, args.pretrained, layers=args.layers,
                          image_size=args.image_size, categories=csv_list(args.categories) or None,
                          fmt=args.format, split=args.split, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          cache=args.cache, resume=args.resume, overwrite=args.overwrite)
    print(f"projections after {meta['epochs']} epochs written to {args.out}; loss per epoch "
          f"{meta['loss_per_epoch']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ImportError as e:
        raise MissingExtra(f"the demo needs the export extra ({e.name or e} is not installed): "
                           "pip install 'clipinspect[export,cpu]'") from e
    run_demo(args.out, model=args.model, pretrained=args.pretrained, shots=args.shots,
             categories=csv_list(args.categories) or None, seed=args.seed, batch_size=args.batch_size)
    return 0


def cmd_prompts_check(args: argparse.Namespace) -> int:
    from .prompt_files import load

    entries = load(args.file)
    for name, entry in entries.items():
        print(f"{name}: {len(entry['normal'])} normal, {len(entry['anomalous'])} anomalous")
    print(f"{args.file}: valid prompt file, {len(entries)} categor{'y' if len(entries) == 1 else 'ies'}")
    return 0


def cmd_prompts_generate(args: argparse.Namespace) -> int:
    import sys

    from .prompt_files import generate

    categories = csv_list(args.categories)
    if not categories:
        raise UsageError("--categories is empty: name at least one category")
    generate(args.url, args.model, categories, args.out, per_state=args.per_state,
             api_key_env=args.api_key_env, timeout=args.timeout, temperature=args.temperature,
             progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {args.out} ({len(categories)} categor{'y' if len(categories) == 1 else 'ies'}); "
          "review it, then pass it to 'clipinspect export --prompts'")
    return 0
def _aprillab_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int_list(1, "6,12,18,24"), default=None,
                   help="aprillab: 1-based blocks whose tokens are the feature levels (default: "
                        "quarter points of the depth, 6,12,18,24 for 24 blocks)")
    p.add_argument("--image-size", type=int, default=None,
                   help="aprillab: square input side, a multiple of the patch size, if not the "
                        "model's own (positional embedding resampled bicubically; APRIL-GAN: 518)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an open_clip CLIP into a bundle (torch)")
    p.add_argument("--model", default="ViT-B-16-plus-240", help="open_clip model name")
    p.add_argument("--pretrained", default="laion400m_e31",
                   help="open_clip tag, local checkpoint file, or 'none' (random init, for tests)")
    p.add_argument("--categories", default="", help="comma-separated category names")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--method", default="winclip", choices=["winclip", "patch", "aprillab"],
                   help="scoring method: winclip (windows + patches, default), patch "
                        "(patch-only, one encoder pass) or aprillab (multi-layer learned "
                        "projections, needs --adapters)")
    p.add_argument("--scales", type=int_list(1, "2,3"), default=None,
                   help="winclip: window scales (default 2,3)")
    p.add_argument("--dense-blocks", type=int, default=None,
                   help="patch: last blocks whose value-value attention makes the patch "
                        "embeddings (default 1)")
    p.add_argument("--adapt", action="store_true",
                   help="per-image contextual prompt adaptation in the scoring graph, with the "
                        "ambiguity filter at export")
    p.add_argument("--tau-ctx", type=float, default=DEFAULT_TAU_CTX,
                   help=f"--adapt: temperature of the prompt weights (default {DEFAULT_TAU_CTX:g})")
    p.add_argument("--top-k", type=int, default=None,
                   help="--adapt: weight only the k most relevant prompts per state (default all)")
    p.add_argument("--prompts", default=None,
                   help="prompt file (JSON or YAML) whose descriptions join the prompt ensemble")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest |onnxruntime - torch| accepted (FP32), default 1e-4")
    p.add_argument("--no-strict-parity", action="store_true",
                   help="keep the bundle even if the parity check fails (it is recorded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init with 'none'")
    p.add_argument("--adapters", default=None,
                   help="aprillab: per-level projection checkpoint (train-adapters' or "
                        "APRIL-GAN's), or 'none' for random projections")
    _aprillab_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train-adapters",
                       help="train AprilLab's per-level projections on an annotated dataset (torch)")
    p.add_argument("data", help="dataset root, MVTec AD or VisA layout, with masks")
    p.add_argument("--out", required=True, help="checkpoint file to write (after every epoch)")
    p.add_argument("--model", default="ViT-L-14-336", help="open_clip model name")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip tag, local checkpoint file, or 'none' (random init, for tests)")
    p.add_argument("--categories", default="", help="comma-separated categories (default all)")
    p.add_argument("--format", default="auto", choices=("auto", "mvtec", "visa"))
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="split with annotated defects (default test, as APRIL-GAN)")
    p.add_argument("--epochs", type=int, default=5, help="0 writes the untrained projections")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (betas 0.5, 0.999)")
    p.add_argument("--seed", type=int, default=0, help="projection init and shuffling")
    p.add_argument("--cache", default=None,
                   help="feature cache folder (default: <out>.features next to the checkpoint)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing --out")
    _aprillab_options(p)
    p.set_defaults(func=cmd_train_adapters)

    p = sub.add_parser("add-category", help="add categories' text embeddings to a bundle (torch)")
    p.add_argument("bundle")
    p.add_argument("names", nargs="+", help="category names as they should appear in prompts")
    p.add_argument("--pretrained", default=None,
                   help="where the export's weights are now, if the recorded path moved")
    p.add_argument("--replace", action="store_true", help="recompute an existing category")
    p.add_argument("--prompts", default=None,
                   help="prompt file (JSON or YAML) whose descriptions join the prompt ensemble")
    p.set_defaults(func=cmd_add_category)

    p = sub.add_parser("prompts", help="prompt files: check one, or generate one with an LLM")
    psub = p.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)
    q = psub.add_parser("check", help="validate a prompt file and count its descriptions")
    q.add_argument("file")
    q.set_defaults(func=cmd_prompts_check)
    q = psub.add_parser("generate", help="ask an OpenAI-compatible chat endpoint for descriptions")
    q.add_argument("--url", required=True,
                   help="base URL (e.g. https://api.openai.com/v1) or full chat-completions URL")
    q.add_argument("--model", required=True, help="model name the endpoint knows")
    q.add_argument("--categories", required=True, help="comma-separated category names")
    q.add_argument("--out", required=True, help="prompt file to write (JSON)")
    q.add_argument("--per-state", type=int, default=10,
                   help="descriptions asked for per state and category (default 10)")
    q.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    q.add_argument("--temperature", type=float, default=0.7)
    q.set_defaults(func=cmd_prompts_generate)

    p = sub.add_parser("demo", help="synthetic data -> export -> few-shot -> inspect -> report")
    p.add_argument("--out", default="demo-output", help="output directory (default demo-output)")
    p.add_argument("--model", default="ViT-B-16-plus-240")
    p.add_argument("--pretrained", default="laion400m_e31",
                   help="tried first; random weights (loudly reported) if it cannot be loaded")
    p.add_argument("--categories", default="", help="synthetic categories (default: two of them)")
    p.add_argument("--shots", type=int, default=2, help="few-shot reference images per category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_demo)

"""The ``clipinspect study`` command's options (registered by ``benchmarks.cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from clipinspect.export.defaults import DEFAULT_MODEL
from clipinspect.runtime.cli.options import (ORT_PROVIDERS, add_batch_size, add_categories,
                                             add_dataset_format, add_provider, csv_list,
                                             int_list, positive_int)
from clipinspect.runtime.core.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipinspect.calibration.evaluate import MIN_POOL

    p.add_argument("data", help="dataset root (MVTec AD or VisA layout), e.g. from 'clipinspect "
                                "synth'")
    p.add_argument("--study", help="study file (JSON, or YAML with PyYAML) naming the variants")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE,...",
                   help="a variant instead of a study file (repeatable), e.g. method=patch,"
                        "prompts=both:prompts.json,adapt=true,precision=int8")
    p.add_argument("--only", default="", metavar="NAME,...",
                   help="run only these variants of the study file (comma-separated names)")
    p.add_argument("--out", required=True, help="report directory (report.md, report.html, "
                                                "study.json, plots; results/ per variant)")
    p.add_argument("--work", default=None, help="bundle cache (default OUT/work)")
    p.add_argument("--model", default=None, help="open_clip model of --variant variants "
                                                 f"(default {DEFAULT_MODEL})")
    p.add_argument("--pretrained", default=None,
                   help="weights of --variant variants: tag, checkpoint, or 'none' (random)")
    p.add_argument("--shots", type=int_list(0, "0,1,4"), default=None,
                   help="reference shot counts (default: the study file's, else 0,1,2,4,8)")
    p.add_argument("--pool-sizes", type=int_list(MIN_POOL, "5,10"), default=None,
                   help="zero-shot pool sizes of the variants whose images score each other "
                        "(musc), besides the whole test set (default: the study file's, else "
                        "none); the other methods ignore them")
    add_categories(p, "categories evaluated (default: the study file's, else all in the data)")
    add_dataset_format(p)
    add_batch_size(p, default=None, help="images per batch (default: the study file's, else 8)")
    p.add_argument("--pixel-size", type=positive_int, default=None,
                   help="resolution of the pixel metrics (default 256)")
    p.add_argument("--timing-images", type=positive_int, default=None,
                   help="timed batch-1 runs per variant and shot count (default 16)")
    p.add_argument("--variant-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a variant's evaluation after this long and record it as failed "
                        "(default: the study file's eval.timeout_s, else 21600 = 6 h)")
    add_provider(p, choices=ORT_PROVIDERS)
    p.add_argument("--force", action="store_true",
                   help="recompute results already stored in OUT/results")


def study_of(args: argparse.Namespace):
    from .spec import (category_list, check_pool_sizes, load_study, pool_sizes, seconds,
                       study_from_dict, variant_flag)

    if bool(args.study) == bool(args.variant):
        raise UsageError("name the variants with --study FILE or with --variant KEY=VALUE,... "
                         "(one of the two)")
    if args.study:
        study = load_study(args.study)
    else:
        defaults = {k: v for k, v in (("model", args.model), ("pretrained", args.pretrained))
                    if v is not None}
        study = study_from_dict({"defaults": defaults,
                                 "variants": [variant_flag(v) for v in args.variant]},
                                Path.cwd(), "--variant")
    only = csv_list(args.only)
    if only:
        unknown = sorted(set(only) - {v.name for v in study.variants})
        if unknown:
            raise UsageError(f"--only {', '.join(unknown)}: no such variant; the study has "
                             f"{', '.join(v.name for v in study.variants)}")
        study = dataclasses.replace(study, variants=tuple(v for v in study.variants
                                                          if v.name in only))
    categories = args.categories
    timeout = args.variant_timeout
    changes = {"shots": tuple(sorted(set(args.shots))) if args.shots else None,
               "categories": category_list(categories, "--categories") if categories else None,
               "pixel_size": args.pixel_size, "timing_images": args.timing_images,
               "batch_size": args.batch_size,
               "timeout_s": None if timeout is None else seconds(timeout, "--variant-timeout"),
               "pool_sizes": None if args.pool_sizes is None else pool_sizes(args.pool_sizes,
                                                                             "--pool-sizes")}
    study = dataclasses.replace(study, **{k: v for k, v in changes.items() if v is not None})
    if args.pool_sizes:  # a file's pool sizes stay valid for an --only subset without musc
        check_pool_sizes(study, "--pool-sizes")
    return study


def _command(args: argparse.Namespace) -> str:
    """The ``clipinspect study`` command of ``args`` (the data as DATA, the work folder as WORK),
    recorded in the report."""
    from ..report import command_of

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return command_of(parser, args, "clipinspect study",
                      {args.data: "DATA", **({args.work: "WORK"} if args.work else {})})


def cmd_study(args: argparse.Namespace) -> int:
    from .runner import RunOptions, run_study

    study = study_of(args)
    options = RunOptions(work=Path(args.work) if args.work else None, force=args.force,
                         fmt=args.format, provider=args.provider, command=_command(args))
    report = run_study(study, args.data, args.out, options)
    failed = 0
    for v in report["variants"]:
        rows = [*((f"{k}-shot", r) for k, r in v["shots"].items()),
                *((f"0-shot in pools of at most {p}", r) for p, r in v.get("pools", {}).items())]
        for run, r in rows:
            if "skipped" in r:
                print(f"clipinspect: {v['name']}: {r['skipped']}", file=sys.stderr)
            elif "error" in r:
                failed += 1
                print(f"clipinspect: {v['name']}, {run} failed: {r['error']}", file=sys.stderr)
    out = Path(args.out)
    print(f"report: {out / 'report.md'} (also report.html, study.json"
          f"{', plots' if report.get('plots') else ''})")
    return 1 if failed else 0

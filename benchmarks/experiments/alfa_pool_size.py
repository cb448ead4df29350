"""Does a larger anomalous prompt pool lift every image's score under contextual prompt
adaptation (the ALFA-style preset, ``--method alfa``)?

Same images, same normal pool (WinCLIP's 147 prompts), the anomalous pool at k = 84 prompts
(WinCLIP's own), 2k and 4k: the extra prompts are WinCLIP's templates with twelve more defect
phrasings (``EXTRA_STATES``, hand-written here, not by an LLM), taken as nested random subsets
(one draw per ``--draws`` seed; 4k is all of them). Each pool goes through the ambiguity filter,
as at export. Images: the test split of the synthetic dataset. Scores come from the preset's own
torch modules (``PatchEncoder``, ``PatchHead`` with ``Adaptation()``: tau 0.01, all prompts), the
modules the ONNX graphs are traced from. With random CLIP weights (no weights can be downloaded
here) the figures show the mechanics of the adaptation, not its accuracy.

    python benchmarks/experiments/alfa_pool_size.py --work scratch/alfa \
        --out benchmarks/results/alfa_pool_size_synth
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from clipinspect.benchmarks.harness import finish, parser
from clipinspect.runtime.cli.options import add_categories

MODEL = "ViT-S-16"
EXTRA_STATES = ("{} with a scratch", "{} with a hole", "{} with a stain", "{} with a crack",
                "{} with a dent", "{} with a tear", "{} with a chip", "{} with a spot",
                "{} with contamination", "{} with a missing part", "{} with discoloration",
                "{} with a burr")


def category_pools(model, tokenizer, category: str) -> tuple[np.ndarray, np.ndarray, int]:
    """-> normal embeddings (147, D), anomalous embeddings (84 + 252, D) with WinCLIP's own
    first, and k = the number of WinCLIP's own anomalous prompts."""
    from clipinspect.export.text import encode_texts, expand_prompts, load_ensemble

    ensemble = load_ensemble("winclip")
    normal, anomalous = expand_prompts(category, ensemble)
    extra = [t.format(s.format(category)) for s in EXTRA_STATES for t in ensemble["templates"]]
    return (encode_texts(model, tokenizer, normal),
            encode_texts(model, tokenizer, anomalous + extra), len(anomalous))


def filtered(normal: np.ndarray, anomalous: np.ndarray):
    """The pools the export stores: ambiguity filter, then each embedding normalized."""
    import torch

    from clipinspect.export.text import ambiguity_filter, normalized

    keep_n, keep_a = ambiguity_filter(normal, anomalous)
    return (torch.from_numpy(normalized(normal[keep_n]).astype(np.float32)),
            torch.from_numpy(normalized(anomalous[keep_a]).astype(np.float32)))


def score_category(features, labels, normal, anomalous, k: int, draws: int) -> list[dict]:
    """One row per (pool size, draw): mean normal / anomalous image score, image AUROC, mean
    map, mean cos(image, adapted anomalous prototype)."""
    import torch

    from clipinspect.calibration.metrics import image_auroc
    from clipinspect.export.methods.common import Adaptation, contextual_prototype, normalize
    from clipinspect.export.methods.patch import PatchHead

    head = PatchHead(tuple(features["grid"]), False, Adaptation()).eval()
    rows, n_all = [], len(anomalous)
    for draw in range(draws):
        extra = np.random.default_rng(draw).permutation(np.arange(k, n_all))
        for size in (k, 2 * k, 4 * k):
            chosen = np.concatenate([np.arange(k), extra[:size - k]])
            pool_n, pool_a = filtered(normal, anomalous[np.sort(chosen)])
            with torch.no_grad():
                score, grid = head(features["image"], features["patches"], pool_n, pool_a)
                proto = contextual_prototype(features["image"], pool_a, Adaptation())
                cos = (normalize(features["image"]) * proto).sum(-1)
            s = score.numpy()
            rows.append({"pool": size, "draw": draw, "kept": len(pool_a),
                         "normal_mean": float(s[~labels].mean()),
                         "anomalous_mean": float(s[labels].mean()),
                         "image_auroc": float(image_auroc(labels, s)),
                         "map_mean": float(grid.mean()), "cos_adapted": float(cos.mean())})
    return rows


def run(work: Path, seed: int, draws: int, categories: Sequence[str] | None = None) -> dict:
    import torch

    from clipinspect.calibration.datasets import load_dataset
    from clipinspect.calibration.synth import CATEGORIES, generate
    from clipinspect.export.clip import load_clip, preprocess_config
    from clipinspect.export.methods.patch import PatchEncoder
    from clipinspect.runtime.core.images import to_rgb_array
    from clipinspect.runtime.core.manifest import Preprocess, parse

    t0 = time.perf_counter()
    categories = list(categories or CATEGORIES)
    generate(work / "data", seed=seed, categories=categories, n_test_good=8,
             n_test_defect_per_type=3)
    model, tokenizer, _ = load_clip(MODEL, None, 0, warn_random=False)
    encoder = PatchEncoder(model.visual, 1).eval()
    size = [int(s) for s in model.visual.image_size]
    preprocess = parse(Preprocess, {**preprocess_config(model), "size": size}, MODEL)
    rows = {}
    for c in categories:
        samples = load_dataset(work / "data", "mvtec", [c], "test")
        with torch.no_grad():
            image, patches, _ = encoder(torch.from_numpy(
                preprocess.batch([to_rgb_array(s.path) for s in samples])))
        labels = np.array([s.is_anomalous for s in samples])
        normal, anomalous, k = category_pools(model, tokenizer, c)
        rows[c] = score_category({"image": image, "patches": patches, "grid": encoder.grid},
                                 labels, normal, anomalous, k, draws)
    return {"benchmark": "alfa_pool_size", "model": MODEL, "weights": "random (seed 0)",
            "data": f"synthetic, seed {seed}, test split (8 good + 12 defective per category)",
            "adaptation": "contextual, tau 0.01, all prompts (the preset's default)",
            "rows": rows, "summary": summarise(rows),
            "seconds": round(time.perf_counter() - t0)}


def summarise(rows: dict) -> list[dict]:
    """Per pool size: the means over categories and draws."""
    flat = [r for category in rows.values() for r in category]
    keys = ("kept", "normal_mean", "anomalous_mean", "image_auroc", "map_mean", "cos_adapted")
    return [{"pool": size, **{key: round(float(np.mean([r[key] for r in flat
                                                          if r["pool"] == size])), 4)
                              for key in keys}}
            for size in sorted({r["pool"] for r in flat})]


def render(r: dict) -> str:
    lines = [f"# Anomalous pool size under contextual prompt adaptation ({r['model']}, "
             f"{r['weights']})", "",
             f"Data: {r['data']}. Adaptation: {r['adaptation']}. Normal pool: WinCLIP's 147 "
             "prompts; anomalous pool: k = 84 (WinCLIP's), 2k and 4k, nested random draws of "
             "hand-written extra phrasings, each through the ambiguity filter. Means over the "
             f"{len(r['rows'])} categories and the draws; image scores zero-shot.", "",
             f"Command: `{r['command']}`", "",
             "| anomalous pool | kept by the filter | mean score, normal images | mean score, "
             "anomalous images | image AUROC | mean map | cos(v, adapted t_a) |",
             "|---|---|---|---|---|---|---|"]
    for s in r["summary"]:
        lines.append(f"| {s['pool']} | {s['kept']:.1f} | {s['normal_mean']:.4f} | "
                     f"{s['anomalous_mean']:.4f} | {s['image_auroc']:.3f} | {s['map_mean']:.4f} | "
                     f"{s['cos_adapted']:.4f} |")
    lines += ["", "Per category (means over the draws):", "",
              "| category | anomalous pool | mean score, normal | mean score, anomalous | "
              "image AUROC |", "|---|---|---|---|---|"]
    for c, rows in r["rows"].items():
        for size in sorted({row["pool"] for row in rows}):
            at = [row for row in rows if row["pool"] == size]
            lines.append(f"| {c} | {size} | {np.mean([a['normal_mean'] for a in at]):.4f} | "
                         f"{np.mean([a['anomalous_mean'] for a in at]):.4f} | "
                         f"{np.mean([a['image_auroc'] for a in at]):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, out="benchmarks/results/alfa_pool_size_synth")
    p.add_argument("--work", required=True, help="scratch folder (the synthetic dataset)")
    p.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    p.add_argument("--draws", type=int, default=3, help="random draws of the extra prompts")
    add_categories(p, "synthetic categories measured (default: all)")
    args = p.parse_args(argv)
    finish(run(Path(args.work), args.seed, args.draws, args.categories), args.out, render,
           script=__file__, argv=argv, placeholders={args.work: "WORK"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

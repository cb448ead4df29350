"""Peak resident memory of inspecting one large JPEG, per input size (``clipinspect bench``'s
``rss_per_image``).

Each size runs in a fresh child process: the kernel's peak-RSS mark (``ru_maxrss``) only ever
rises, so one process per size keeps a smaller image's figure free of a larger one's, and it
counts what tracemalloc misses (PIL's and onnxruntime's C buffers). The child opens the
inspector, inspects a small image once (so the session's arenas and the heads' buffers reach
their steady size), reads the mark, inspects the large JPEG at batch 1 and reads the mark again:
the difference is the memory one image of that size adds (decode, resize, map, mask).

    python -m clipinspect.benchmarks.rss_probe BUNDLE --megapixels 1,12,64 \
        --out benchmarks/results/rss_per_image_cpu_b16p
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_jpeg(path: Path, megapixels: float, quality: int = 90) -> tuple[int, int]:
    """A 4:3 JPEG of about ``megapixels``, a textured pattern (so it does not compress to
    nothing) -> (width, height)."""
    from PIL import Image

    height = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    width = int(round(height * 4 / 3))
    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(tile).resize((width, height), Image.Resampling.BILINEAR).save(
        path, quality=quality)
    return width, height


def probe(bundle: str, image: str, precision: str, category: str | None) -> dict:
    """In this process: the peak RSS before and after inspecting ``image`` (see the module
    docstring)."""
    from clipinspect.runtime import Inspector

    inspector = Inspector.open(bundle, precision)
    category = category or inspector.bundle.categories[0]
    warm = np.full((256, 256, 3), 128, np.uint8)
    inspector.inspect([warm], category, batch_size=1, mode="zero-shot")
    before = peak_rss_mb()
    result = inspector.inspect([image], category, batch_size=1, mode="zero-shot")[0]
    after = peak_rss_mb()
    return {"peak_rss_mb": after, "steady_peak_rss_mb": before,
            "per_image_mb": after - before, "error": result.error,
            "map_size": list(result.anomaly_map.shape) if result.ok else None}


def rss_per_image(bundle: str | Path, folder: Path, megapixels: Sequence[float], *,
                  precision: str = "fp32", max_megapixels: float | None = None,
                  jpeg_draft: bool | None = None) -> list[dict]:
    """One child process per size (see the module docstring); rows with the JPEG's size.
    ``jpeg_draft``: reduced JPEG decoding in the children (None: as in this process)."""
    import os

    from clipinspect.runtime.core.images import JPEG_DRAFT_ENV
    from clipinspect.runtime.core.images import jpeg_draft as draft_in_force

    rows = []
    env = dict(os.environ)
    if max_megapixels is not None:
        env["CLIPINSPECT_MAX_MEGAPIXELS"] = str(max_megapixels)
    env[JPEG_DRAFT_ENV] = "1" if (draft_in_force() if jpeg_draft is None else jpeg_draft) else "0"
    for mp in megapixels:
        path = folder / f"probe_{mp:g}mp.jpg"
        width, height = write_jpeg(path, mp)
        out = subprocess.run([sys.executable, "-m", "clipinspect.benchmarks.rss_probe",
                              str(bundle), "--image", str(path), "--precision", precision],
                             capture_output=True, text=True, env=env, timeout=1800)
        row = {"megapixels": mp, "jpeg_size": [width, height], "file_mb": path.stat().st_size / 1e6,
               "jpeg_draft": env[JPEG_DRAFT_ENV] == "1"}
        if out.returncode != 0:
            row["error"] = (out.stderr.strip().splitlines() or ["probe failed"])[-1]
        else:
            row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
        path.unlink()
    return rows


def render_rss(rows: list[dict]) -> list[str]:
    """Markdown lines of the rows of :func:`rss_per_image` (none for no rows)."""
    if not rows:
        return []
    lines = ["", "Peak RSS per image: one JPEG inspected at batch 1 in a fresh process, after a "
                 "warm-up image; peak = ru_maxrss after it, per image = that minus the peak "
                 "after the warm-up (decode, resize, map).", "",
             "| JPEG | size | decoding | peak RSS MB | per image MB | map size | result |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        size = "x".join(map(str, row["jpeg_size"]))
        map_size = "x".join(map(str, row["map_size"][::-1])) if row.get("map_size") else ""
        decoding = "reduced (--jpeg-draft)" if row.get("jpeg_draft") else "whole"
        lines.append(f"| {row['megapixels']:g} MP | {size} | {decoding} | "
                     f"{_mb(row.get('peak_rss_mb'))} | "
                     f"{_mb(row.get('per_image_mb'))} | {map_size} | "
                     f"{row.get('error') or 'ok'} |")
    return lines


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--image", help="probe this one image in this process (the child's mode)")
    ap.add_argument("--megapixels", default="1,12,64", help="JPEG sizes, one child each")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--category", default=None)
    ap.add_argument("--decoding", choices=["whole", "draft", "both"], default="both",
                    help="JPEG decoding for the model: whole (the default of every command), "
                         "draft (--jpeg-draft) or both, one row each")
    ap.add_argument("--out", default="benchmarks/results/rss_per_image_cpu",
                    help="output path without extension (.json and .md are written)")
    args = ap.parse_args(argv)
    if args.image:
        print(json.dumps(probe(args.bundle, args.image, args.precision, args.category)))
        return
    import os
    import tempfile

    from clipinspect.runtime import Bundle
    from clipinspect.runtime.core.images import max_pixels

    from .report import machine, write_results

    sizes = [float(v) for v in args.megapixels.split(",") if v.strip()]
    with tempfile.TemporaryDirectory(prefix="clipinspect-rss-") as tmp:
        rows = [row for draft in {"whole": [False], "draft": [True],
                                  "both": [False, True]}[args.decoding]
                for row in rss_per_image(args.bundle, Path(tmp), sizes, precision=args.precision,
                                         jpeg_draft=draft)]
    bundle = Bundle.open(args.bundle)
    result = {"benchmark": "rss_per_image", "bundle": bundle.identity,
              "model": bundle.manifest.model.name, "precision": args.precision,
              "max_megapixels": max_pixels() / 1e6,
              "command": "python -m clipinspect.benchmarks.rss_probe "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows, "load_average": list(os.getloadavg()), "machine": machine()}
    write_results(result, args.out, lambda r: "\n".join(
        [f"# Peak RSS per image: {r['model']} ({r['precision']}), pixel limit "
         f"{r['max_megapixels']:g} MP", "", f"Command: `{r['command']}`",
         *render_rss(r["rows"])]) + "\n")


if __name__ == "__main__":
    main()

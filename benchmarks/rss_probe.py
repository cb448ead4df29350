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
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM; Linux), MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def write_jpeg(path: Path, megapixels: float, quality: int = 90) -> tuple[int, int]:
    """A 4:3 JPEG of about ``megapixels``, a textured pattern (so it does not compress to
    nothing) -> (width, height)."""
    height = int(round((megapixels * 1e6 * 3 / 4) ** 0.5))
    width = int(round(height * 4 / 3))
    return write_jpeg_size(path, width, height, quality)


# Image kinds of --kinds: a small file that decodes large (what each one is: the module docstring).
KINDS = ("jpeg", "png16", "tiff32", "tiff-float", "la", "rgba", "webp")


def write_kind(path: Path, kind: str, width: int, height: int) -> Path:
    """A smooth gradient image of that kind (it compresses to a small file, as an attacker's
    would) -> the path written (its suffix set by the kind)."""
    from PIL import Image

    if kind == "jpeg":
        write_jpeg_size(path.with_suffix(".jpg"), width, height)
        return path.with_suffix(".jpg")
    ramp = (np.arange(width, dtype=np.uint32)[None, :] * 7
            + np.arange(height, dtype=np.uint32)[:, None] * 3) % 65536
    level = (ramp % 256).astype(np.uint8)
    if kind == "png16":
        Image.fromarray(ramp.astype(np.uint16)).save(path.with_suffix(".png"), compress_level=9)
        return path.with_suffix(".png")
    if kind in ("tiff32", "tiff-float"):  # rows of one value: deflate needs runs to shrink it
        values = np.repeat(ramp[:, :1], width, axis=1).astype(np.int32 if kind == "tiff32"
                                                              else np.float32)
        Image.fromarray(values).save(path.with_suffix(".tif"), compression="tiff_deflate")
        return path.with_suffix(".tif")
    if kind in ("la", "rgba"):
        channels = [level, 255 - level] if kind == "la" else [level, 255 - level, level, level]
        Image.fromarray(np.stack(channels, -1)).save(path.with_suffix(".png"), compress_level=9)
        return path.with_suffix(".png")
    if kind == "webp":
        Image.fromarray(np.stack([level, 255 - level, level], -1)).save(
            path.with_suffix(".webp"), quality=50, method=0)
        return path.with_suffix(".webp")
    raise ValueError(f"image kind {kind!r}: expected one of {', '.join(KINDS)}")


def write_jpeg_size(path: Path, width: int, height: int, quality: int = 90) -> tuple[int, int]:
    """A width x height JPEG of the textured pattern of :func:`write_jpeg`."""
    from PIL import Image

    tile = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(tile).resize((width, height), Image.Resampling.BILINEAR).save(
        path, quality=quality)
    return width, height


def probe(bundle: str, image: str, precision: str, category: str | None) -> dict:
    """In this process: the peak RSS before and after decoding, then inspecting, ``image`` (see
    the module docstring)."""
    from clipinspect.runtime import Inspector
    from clipinspect.runtime.core.images import ImageError, decode

    inspector = Inspector.open(bundle, precision)
    category = category or inspector.bundle.categories[0]
    warm = np.full((256, 256, 3), 128, np.uint8)
    inspector.inspect([warm], category, batch_size=1, mode="zero-shot")
    before = peak_rss_mb()
    try:
        decode(image)
    except ImageError:
        pass  # the inspection below reports it
    decoded = peak_rss_mb()
    result = inspector.inspect([image], category, batch_size=1, mode="zero-shot")[0]
    after = peak_rss_mb()
    return {"peak_rss_mb": after, "steady_peak_rss_mb": before,
            "decode_mb": decoded - before, "per_image_mb": after - before,
            "error": result.error,
            "map_size": list(result.anomaly_map.shape) if result.ok else None}


def rss_per_image(bundle: str | Path, folder: Path, megapixels: Sequence[float], *,
                  precision: str = "fp32", max_megapixels: float | None = None,
                  jpeg_draft: bool | None = None) -> list[dict]:
    """One child process per size (see the module docstring); rows with the JPEG's size.
    ``jpeg_draft``: reduced JPEG decoding in the children (None: as in this process)."""
    from clipinspect.runtime.core.images import JPEG_DRAFT_ENV
    from clipinspect.runtime.core.images import jpeg_draft as draft_in_force

    env = _child_env(max_megapixels)
    env[JPEG_DRAFT_ENV] = "1" if (draft_in_force() if jpeg_draft is None else jpeg_draft) else "0"
    rows = []
    for mp in megapixels:
        path = folder / f"probe_{mp:g}mp.jpg"
        width, height = write_jpeg(path, mp)
        row = {"megapixels": mp, "jpeg_size": [width, height], "file_mb": path.stat().st_size / 1e6,
               "jpeg_draft": env[JPEG_DRAFT_ENV] == "1"}
        rows.append({**row, **_probe_child(bundle, path, precision, env)})
        path.unlink()
    return rows


def rss_per_kind(bundle: str | Path, folder: Path, kinds: Sequence[tuple[str, int, int]], *,
                 precision: str = "fp32", max_megapixels: float | None = None) -> list[dict]:
    """One child process per (kind, width, height) (see the module docstring), whole JPEG
    decoding as every command's default; rows with the kind, size and file size."""
    from clipinspect.runtime.core.images import JPEG_DRAFT_ENV

    env = _child_env(max_megapixels)
    env[JPEG_DRAFT_ENV] = "0"
    rows = []
    for kind, width, height in kinds:
        path = write_kind(folder / f"probe_{kind}", kind, width, height)
        row = {"kind": kind, "size": [width, height], "file_mb": path.stat().st_size / 1e6}
        rows.append({**row, **_probe_child(bundle, path, precision, env)})
        path.unlink()
    return rows


def _child_env(max_megapixels: float | None) -> dict:
    import os

    env = dict(os.environ)
    if max_megapixels is not None:
        env["CLIPINSPECT_MAX_MEGAPIXELS"] = str(max_megapixels)
    return env


def _probe_child(bundle: str | Path, path: Path, precision: str, env: dict) -> dict:
    """:func:`probe` of ``path`` in a fresh child process -> its row, or {"error": ...}."""
    out = subprocess.run([sys.executable, "-m", "clipinspect.benchmarks.rss_probe", str(bundle),
                          "--image", str(path), "--precision", precision],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["probe failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def render_rss(rows: list[dict]) -> list[str]:
    """Markdown lines of the rows of :func:`rss_per_image` (none for no rows)."""
    if not rows:
        return []
    lines = ["", "Peak RSS per image: one JPEG inspected at batch 1 in a fresh process, after a "
                 "warm-up image; peak = the child's peak RSS (VmHWM) after it, per image = that "
                 "minus the peak after the warm-up (decode, resize, map).", "",
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


def render_kinds(rows: list[dict]) -> list[str]:
    """Markdown lines of the rows of :func:`rss_per_kind` (none for no rows)."""
    if not rows:
        return []
    lines = ["", "Peak RSS per image by kind: each image decoded, then inspected at batch 1, in a "
                 "fresh process after a warm-up image; decode / per image = the child's peak RSS "
                 "(VmHWM) after the decode / after the inspection minus the peak after the "
                 "warm-up. MB are MiB.", "",
             "| kind | size | file KB | decode MB | per image MB | peak RSS MB | map size | "
             "result |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        map_size = "x".join(map(str, row["map_size"][::-1])) if row.get("map_size") else ""
        lines.append(f"| {row['kind']} | {'x'.join(map(str, row['size']))} | "
                     f"{row['file_mb'] * 1000:.0f} | {_mb(row.get('decode_mb'))} | "
                     f"{_mb(row.get('per_image_mb'))} | {_mb(row.get('peak_rss_mb'))} | "
                     f"{map_size} | {row.get('error') or 'ok'} |")
    return lines


def parse_kinds(text: str) -> list[tuple[str, int, int]]:
    """``KIND:WIDTHxHEIGHT,...`` -> [(kind, width, height)]."""
    kinds = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        kind, _, size = item.partition(":")
        width, _, height = size.partition("x")
        if kind not in KINDS or not (width.isdigit() and height.isdigit()):
            raise SystemExit(f"--kinds {item!r}: expected KIND:WIDTHxHEIGHT with KIND one of "
                             f"{', '.join(KINDS)}, e.g. png16:6300x6300")
        kinds.append((kind, int(width), int(height)))
    return kinds


def _mb(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--image", help="probe this one image in this process (the child's mode)")
    ap.add_argument("--megapixels", default="1,12,64", help="JPEG sizes, one child each")
    ap.add_argument("--kinds", default=None,
                    help=f"probe these image kinds instead, KIND:WIDTHxHEIGHT,... with KIND one "
                         f"of {', '.join(KINDS)} (e.g. png16:6300x6300,jpeg:8000x8000)")
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
    import tempfile

    from clipinspect.runtime import Bundle
    from clipinspect.runtime.core.images import max_pixels

    from .report import command_line, environment, write_results

    with tempfile.TemporaryDirectory(prefix="clipinspect-rss-") as tmp:
        if args.kinds:
            rows = rss_per_kind(args.bundle, Path(tmp), parse_kinds(args.kinds),
                                precision=args.precision)
        else:
            rows = _jpeg_rows(args, Path(tmp))
    bundle = Bundle.open(args.bundle)
    result = {"benchmark": "rss_per_kind" if args.kinds else "rss_per_image",
              "bundle": bundle.identity,
              "model": bundle.manifest.model.name, "precision": args.precision,
              "max_megapixels": max_pixels() / 1e6,
              "command": command_line("python -m clipinspect.benchmarks.rss_probe", argv,
                                      {args.bundle: "BUNDLE"}),
              "rows": rows, **environment()}
    write_results(result, args.out, lambda r: "\n".join(
        [f"# Peak RSS per image: {r['model']} ({r['precision']}), pixel limit "
         f"{r['max_megapixels']:g} MP", "", f"Command: `{r['command']}`",
         *(render_kinds if args.kinds else render_rss)(r["rows"])]) + "\n")


def _jpeg_rows(args: argparse.Namespace, folder: Path) -> list[dict]:
    """The rows of --megapixels, once per JPEG decoding asked by --decoding."""
    sizes = [float(v) for v in args.megapixels.split(",") if v.strip()]
    drafts = {"whole": [False], "draft": [True], "both": [False, True]}[args.decoding]
    return [row for draft in drafts
            for row in rss_per_image(args.bundle, folder, sizes, precision=args.precision,
                                     jpeg_draft=draft)]


if __name__ == "__main__":
    main()

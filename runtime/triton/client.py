"""A small Triton client for a repository written by ``clipinspect triton``.

    pip install "clipinspect[triton]"
    python -m clipinspect.runtime.triton.client --url localhost:8001 --category bottle a.png b.png

Images are prepared exactly as the runtime prepares them (same resize and normalization, read
from the encoder's model config, so the client needs no bundle), sent with the category name to
the zero-shot or few-shot ensemble, and one JSON line per image is printed: image score and the
maximum of the anomaly grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..core.images import to_rgb_array
from ..core.manifest import Preprocess, parse
from .repository import ENCODER, ENSEMBLES


def preprocessing_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The encoder's model config (as JSON, e.g. ``get_model_config(..., as_json=True)``) ->
    size, mean and std the images need."""
    value = config["parameters"]["clipinspect_preprocessing"]
    return json.loads(value.get("string_value", value.get("stringValue", "")))


def prepare(paths: list[str], prep: dict[str, Any]) -> np.ndarray:
    """Images -> (B, 3, H, W) float32, prepared by the bundle's preprocessing (``prep``: the
    encoder's clipinspect_preprocessing parameter)."""
    preprocess = parse(Preprocess, prep, "the Triton encoder's config",
                       "clipinspect_preprocessing")
    return preprocess.batch([to_rgb_array(p) for p in paths])


def make_inputs(grpcclient, images: np.ndarray, category: str) -> list:
    batch = grpcclient.InferInput("images", list(images.shape), "FP32")
    batch.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    name = grpcclient.InferInput("category", [1], "BYTES")
    name.set_data_from_numpy(np.array([category.encode("utf-8")], dtype=np.object_))
    return [batch, name]


def infer(url: str, paths: list[str], category: str, mode: str = "zeroshot"
          ) -> tuple[np.ndarray, np.ndarray]:
    """-> (image scores (B,), anomaly grids (B, gh, gw))."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    prep = preprocessing_from_config(client.get_model_config(ENCODER, as_json=True)["config"])
    outputs = [grpcclient.InferRequestedOutput("image_score"),
               grpcclient.InferRequestedOutput("anomaly_grid")]
    result = client.infer(ENSEMBLES[mode], make_inputs(grpcclient, prepare(paths, prep), category),
                          outputs=outputs)
    return result.as_numpy("image_score"), result.as_numpy("anomaly_grid")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--url", default="localhost:8001", help="Triton's gRPC address")
    p.add_argument("--category", required=True)
    p.add_argument("--mode", default="zeroshot", choices=sorted(ENSEMBLES))
    args = p.parse_args(argv)
    scores, grids = infer(args.url, args.images, args.category, args.mode)
    for path, score, grid in zip(args.images, scores, grids):
        print(json.dumps({"source": path, "image_score": float(score),
                          "map_max": float(grid.max())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

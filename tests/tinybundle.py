"""A tiny bundle built without torch: the same contract as a real export, with a toy model.

Same graph files, input and output names, axes conventions and manifest (format version 2,
validated by ``Manifest.from_dict`` and written with the bundle's own save, so checksums are
real) as ``clipinspect export``, for the methods
``winclip`` and ``patch`` (optionally with contextual prompt adaptation). The model is not CLIP:

    encoder   images (B, 3, 224, 224) -> patch_tokens (B, P, C) = tanh(conv 16x16 stride 16), on a
              14 x 14 grid (P = 196, C = WIDTH); image_embedding (B, D) = mean of the tokens @ proj;
              window_embeddings_k (B, W_k, D) = mean of the tokens of each k x k window @ proj;
              patch_embeddings (B, P, D) = tokens @ proj (patch method).
    text      each prompt embeds to a fixed "normal" or "anomalous" direction plus a
              prompt-seeded perturbation (D = EMBED).
    heads     cosine class scores against the (adapted) text, window scores averaged onto the
              patches they cover; few-shot adds the cosine distance of each patch token (and
              window) to its nearest reference in memory. Scores lie in [0, 1]; an image unlike
              the references scores higher; every image is scored on its own (batch-invariant).

It builds in well under a second, so runtime, CLI, service and hot-folder tests do not need
torch. Numerics against torch are tested on real exports only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from clipinspect.export import prompt_format
from clipinspect.runtime.core.bundle import (FORMAT_NAME, FORMAT_VERSION, Bundle,
                                             atomic_write_bytes, category_dir,
                                             check_category_name, file_entry, npz_bytes,
                                             sha256_file,
                                             write_versioned)
from clipinspect.runtime.core.manifest import Manifest

MODEL_NAME = "tiny-test"
SIZE = 224          # input height and width
PATCH = 16
GRID = (SIZE // PATCH, SIZE // PATCH)
# The input size and widths of the small real export (224 x 224, C = D = 384), with ViT-S-16's
# 14 x 14 grid (the small export's ViT-S-32 has 7 x 7: tests/test_tinybundle.py checks the
# same contract at both); without the transformer an image costs about 0.1 GFLOP.
WIDTH = 384         # C, patch token width
EMBED = 384         # D, joint embedding width
TEMPERATURE = 0.07
OPSET = 17
PROBE_PROMPT = "a photo of an object."  # the exporter's text-tower fingerprint prompt
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


class Graph:
    """Collects nodes and constants of one ONNX graph; each op returns its output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op.lower()}_{self._n}"

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("const")
        self.constants.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._name(op)
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def op2(self, op: str, *inputs: str, **attrs) -> tuple[str, str]:
        outs = [self._name(op), self._name(op)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0], outs[1]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="clipinspect-tests")
        onnx.checker.check_model(model, full_check=True)
        return model

    # ---------------------------------------------------------------- shared scoring pieces
    def normalize(self, x: str) -> str:
        norm = self.op("ReduceL2", x, axes=[-1], keepdims=1)
        return self.op("Div", x, self.op("Max", norm, self.const(1e-12)))

    def class_score(self, x: str, text: str) -> str:
        """x (B, N, D), text (2, D) or per image (B, 1, 2, D), normalized rows [normal,
        anomalous] -> (B, N): softmax([cos normal, cos anomalous] / temperature), anomalous."""
        logits = self.dot(self.unsqueeze(self.normalize(x), 2), text)               # (B, N, 2)
        probs = self.op("Softmax", self.op("Div", logits, self.const(TEMPERATURE)), axis=-1)
        return self.op("Gather", probs, self.const(1, np.int64), axis=-1)

    def dot(self, a: str, b: str) -> str:
        """Dot products along the last axis of two broadcastable tensors. A product, not a
        MatMul: onnxruntime multiplies a single row by a matrix input another way than several
        rows, and a score must not depend on what else is in its batch."""
        return self.op("ReduceSum", self.op("Mul", a, b), self.const([-1], np.int64),
                       keepdims=0)

    def distance(self, x: str, memory: str) -> str:
        """x (B, N, E), memory (M, E) -> (B, N): (1 - cos) / 2 to the nearest memory entry."""
        cos = self.op("MatMul", self.normalize(x),
                      self.op("Transpose", self.normalize(memory), perm=[1, 0]))
        half = self.op("Mul", self.op("Sub", self.const(1.0), cos), self.const(0.5))
        return self.op("ReduceMin", half, axes=[-1], keepdims=0)

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.const([axis], np.int64))


def window_cover(k: int) -> np.ndarray:
    """(W_k, P) float32: row w is 1 on the patches of the k x k window w (stride 1, row-major)."""
    gh, gw = GRID
    rows = []
    for i in range(gh - k + 1):
        for j in range(gw - k + 1):
            m = np.zeros(GRID, np.float32)
            m[i:i + k, j:j + k] = 1.0
            rows.append(m.ravel())
    return np.stack(rows)


def value(name: str, shape: Sequence) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


# ------------------------------------------------------------------------------------ encoder
def encoder_outputs(method: str, scales: Sequence[int]) -> list[str]:
    if method == "patch":
        return ["image_embedding", "patch_embeddings", "patch_tokens"]
    return ["image_embedding", *[f"window_embeddings_{k}" for k in scales], "patch_tokens"]


def build_encoder(method: str, scales: Sequence[int], seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    g = Graph()
    conv = g.op("Conv", "images", g.const(rng.standard_normal((WIDTH, 3, PATCH, PATCH)) * 0.3),
                g.const(rng.standard_normal(WIDTH) * 0.1), kernel_shape=[PATCH, PATCH],
                strides=[PATCH, PATCH])
    flat = g.op("Reshape", g.op("Tanh", conv), g.const([0, WIDTH, -1], np.int64))
    tokens = g.op("Transpose", flat, perm=[0, 2, 1], out="patch_tokens")           # (B, P, C)
    proj = g.const(rng.standard_normal((WIDTH, EMBED)) / np.sqrt(WIDTH))
    p = GRID[0] * GRID[1]
    # The mean over patches as a product: onnxruntime's ReduceMean over a middle axis rounds
    # differently with the batch size, and a score must not depend on its batch.
    pooled = g.op("MatMul", g.const(np.full((1, p), 1.0 / p)), tokens)             # (B, 1, C)
    g.op("MatMul", g.op("Squeeze", pooled, g.const([1], np.int64)), proj, out="image_embedding")
    outputs = [value("image_embedding", ["batch", EMBED])]
    if method == "patch":
        g.op("MatMul", tokens, proj, out="patch_embeddings")
        outputs.append(value("patch_embeddings", ["batch", p, EMBED]))
    for k in scales:
        cover = window_cover(k)
        pooled = g.op("MatMul", g.const(cover / (k * k)), tokens)                   # (B, W, C)
        g.op("MatMul", pooled, proj, out=f"window_embeddings_{k}")
        outputs.append(value(f"window_embeddings_{k}", ["batch", len(cover), EMBED]))
    outputs.append(value("patch_tokens", ["batch", p, WIDTH]))
    return g.model([value("images", ["batch", 3, SIZE, SIZE])], outputs, "tiny_encoder")


# -------------------------------------------------------------------------------------- heads
def head_inputs(method: str, scales: Sequence[int], few_shot: bool, adaptation: dict | None
                ) -> list[onnx.ValueInfoProto]:
    """The real heads' inputs, in their order, with their dynamic axes."""
    p = GRID[0] * GRID[1]
    names = [value("image_embedding", ["batch", EMBED])]
    if method == "patch":
        names.append(value("patch_embeddings", ["batch", p, EMBED]))
    names += [value(f"window_embeddings_{k}", ["batch", len(window_cover(k)), EMBED])
              for k in scales]
    if few_shot:
        names.append(value("patch_tokens", ["batch", p, WIDTH]))
    if adaptation:
        names += [value("text_normal", ["text_normal", EMBED]),
                  value("text_anomalous", ["text_anomalous", EMBED])]
    else:
        names.append(value("text_prototypes", [2, EMBED]))
    if few_shot:
        names.append(value("memory_patch_tokens", ["memory_patch_tokens", WIDTH]))
        names += [value(f"memory_window_embeddings_{k}", [f"memory_window_embeddings_{k}", EMBED])
                  for k in scales]
    return names


def adapted_text(g: Graph, adaptation: dict) -> str:
    """Per-image text (B, 1, 2, D): each state's pool weighted by softmax(cos(image, prompt) /
    tau) over its top-k prompts, normalized."""
    image = g.unsqueeze(g.normalize("image_embedding"), 1)                          # (B, 1, D)
    states = []
    for pool_name in ("text_normal", "text_anomalous"):
        pool = g.normalize(pool_name)                                               # (N, D)
        relevance = g.dot(image, pool)                                              # (B, N)
        if adaptation.get("top_k"):
            kth_values, _ = g.op2("TopK", relevance, g.const([adaptation["top_k"]], np.int64),
                                  axis=-1)
            kth = g.op("ReduceMin", kth_values, axes=[-1], keepdims=1)
            relevance = g.op("Where", g.op("Less", relevance, kth), g.const(-np.inf), relevance)
        weights = g.op("Softmax", g.op("Div", relevance, g.const(adaptation["tau"])), axis=-1)
        prototype = g.dot(g.unsqueeze(weights, 1), g.op("Transpose", pool, perm=[1, 0]))
        states.append(g.op("Unsqueeze", g.normalize(prototype),
                           g.const([1, 2], np.int64)))                              # (B, 1, 1, D)
    return g.op("Concat", *states, axis=2)


def scale_to_patches(g: Graph, window_scores: str, k: int) -> str:
    """(B, W_k) window scores -> (B, P): the mean over the windows covering each patch."""
    cover = window_cover(k)
    return g.op("MatMul", window_scores, g.const(cover / cover.sum(axis=0)))


def build_head(method: str, scales: Sequence[int], few_shot: bool, adaptation: dict | None
               ) -> onnx.ModelProto:
    g = Graph()
    text = adapted_text(g, adaptation) if adaptation else g.normalize("text_prototypes")
    image_score = g.op("Squeeze", g.class_score(g.unsqueeze("image_embedding", 1), text),
                       g.const([1], np.int64))                                      # (B,)
    terms = [g.unsqueeze(image_score, 1)]
    if method == "patch":
        terms.append(g.class_score("patch_embeddings", text))
    terms += [scale_to_patches(g, g.class_score(f"window_embeddings_{k}", text), k)
              for k in scales]
    zero_shot = mean(g, terms)                                                      # (B, P)
    if few_shot:
        few = [g.distance("patch_tokens", "memory_patch_tokens")]
        few += [scale_to_patches(g, g.distance(f"window_embeddings_{k}",
                                               f"memory_window_embeddings_{k}"), k)
                for k in scales]
        few_shot_map = mean(g, few)
        worst = g.op("ReduceMax", few_shot_map, axes=[1], keepdims=0)
        image_score = g.op("Mul", g.op("Add", image_score, worst), g.const(0.5))
        zero_shot = mean(g, [zero_shot, few_shot_map])
    g.op("Identity", image_score, out="image_score")
    g.op("Reshape", zero_shot, g.const([-1, *GRID], np.int64), out="anomaly_grid")
    return g.model(head_inputs(method, scales, few_shot, adaptation),
                   [value("image_score", ["batch"]), value("anomaly_grid", ["batch", *GRID])],
                   "tiny_head")


def mean(g: Graph, terms: list[str]) -> str:
    """Mean of same-shaped (or broadcastable to the last one) terms."""
    total = terms[0]
    for t in terms[1:]:
        total = g.op("Add", total, t)
    return g.op("Mul", total, g.const(1.0 / len(terms)))


# --------------------------------------------------------------------------------------- text
def embed_prompts(prompts: Sequence[str], state: str) -> np.ndarray:
    """(N, D) raw embeddings: the state's fixed direction plus a perturbation seeded by the
    prompt, so a prompt always embeds the same way and the two states stay apart."""
    direction = np.random.default_rng({"normal": 10, "anomalous": 11}[state]).standard_normal(EMBED)
    rows = []
    for prompt in prompts:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        rows.append(direction + 0.3 * np.random.default_rng(seed).standard_normal(EMBED))
    return np.asarray(rows, np.float32)


def text_probe() -> list[float]:
    """The weights fingerprint a real export records: the first 16 values of the probe
    prompt's embedding."""
    return [round(float(v), 6) for v in embed_prompts([PROBE_PROMPT], "normal")[0, :16]]


def category_text(name: str, descriptions: dict | None, adaptation: dict | None
                  ) -> tuple[dict, dict]:
    """text.npz arrays and the prompts.json record of one category, as the exporter writes them
    (the WinCLIP ensemble's prompts, then the prompt file's)."""
    ensemble = json.loads(resources.files("clipinspect.export.prompts")
                          .joinpath("winclip.json").read_text())
    extra = {s: prompt_format.expand((descriptions or {}).get(s, []), name)
             for s in ("normal", "anomalous")}
    prompts = {s: [t.format(p.format(name)) for p in ensemble[f"{s}_states"]
                   for t in ensemble["templates"]] + extra[s] for s in ("normal", "anomalous")}
    emb = {s: embed_prompts(prompts[s], s) for s in prompts}
    arrays = {"prototypes": np.stack([emb["normal"].mean(0), emb["anomalous"].mean(0)]),
              "normal_embeddings": emb["normal"], "anomalous_embeddings": emb["anomalous"]}
    if adaptation:
        for s in ("normal", "anomalous"):
            arrays[f"text_{s}"] = emb[s] / np.linalg.norm(emb[s], axis=-1, keepdims=True)
    record = {"category": name, **prompts, "from_prompt_file": extra}
    return arrays, record


def write_category(root: Path, name: str, prompt_file: dict | None, adaptation: dict | None
                   ) -> dict:
    """The category's files and manifest entry; prompt_file: {"file", "sha256", "categories"}
    of a loaded prompt file, or None."""
    descriptions = (prompt_file or {}).get("categories", {}).get(name)
    arrays, record = category_text(name, descriptions, adaptation)
    folder = category_dir(name)
    text = write_versioned(root, folder, "text.npz", npz_bytes(arrays))
    prompts = write_versioned(root, folder, "prompts.json",
                              (json.dumps(record, indent=1) + "\n").encode())
    return {"text": file_entry(root, text), "prompts": file_entry(root, prompts),
            "n_normal_prompts": len(record["normal"]),
            "n_anomalous_prompts": len(record["anomalous"]),
            "prompt_file": {"file": prompt_file["file"], "sha256": prompt_file["sha256"],
                            **{f"n_{s}": len(v) for s, v in descriptions.items()}}
            if descriptions else None,
            "ambiguity_filter_dropped": None,
            "memory": None, "thresholds": None}


# ------------------------------------------------------------------------------------- bundle
def build_tiny_bundle(out: str | Path, categories: Sequence[str] = ("weave", "washer"),
                      method: str = "winclip", *, scales: Sequence[int] = (2, 3),
                      adaptation: dict | None = None, prompts: str | Path | None = None,
                      seed: int = 0) -> Bundle:
    """Write a tiny bundle to ``out`` (a new or empty directory) and open it.

    adaptation: None, or {"tau": ..., "top_k": ...} for contextual prompt adaptation.
    prompts: a prompt file whose descriptions join the categories it names.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    scales = tuple(sorted(scales)) if method == "winclip" else ()
    if adaptation is not None:
        adaptation = {"kind": "contextual", "tau": adaptation["tau"],
                      "top_k": adaptation.get("top_k")}
    files = {"encoder": "fp32/encoder.onnx", "head_zeroshot": "fp32/head_zeroshot.onnx",
             "head_fewshot": "fp32/head_fewshot.onnx"}
    models = {"encoder": build_encoder(method, scales, seed),
              "head_zeroshot": build_head(method, scales, False, adaptation),
              "head_fewshot": build_head(method, scales, True, adaptation)}
    graphs = {}
    for name, model in models.items():
        atomic_write_bytes(root / files[name], model.SerializeToString())
        graphs[name] = file_entry(root, files[name],
                                  inputs=[v.name for v in model.graph.input],
                                  outputs=[v.name for v in model.graph.output])
    prompt_file = None if prompts is None else {
        "file": str(Path(prompts).resolve()), "sha256": sha256_file(Path(prompts)),
        "categories": prompt_format.load(prompts)}
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "method": method,
        "method_options": {"scales": list(scales)} if method == "winclip" else {"dense_blocks": 1},
        "adaptation": adaptation,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": MODEL_NAME, "weights": {"kind": "random", "seed": seed,
                                                  "text_probe": text_probe()}},
        "preprocess": {"size": [SIZE, SIZE], "mean": MEAN, "std": STD,
                  "resize": "bicubic-antialiased, whole image, no crop",
                  "layout": "NCHW float32 RGB"},
        "grid": list(GRID), "patch_size": PATCH,
        **({"scales": list(scales), "windows": {str(k): len(window_cover(k)) for k in scales}}
           if method == "winclip" else {}),
        "outputs": encoder_outputs(method, scales),
        # No "layers": there is no transformer here.
        "dims": {"embed": EMBED, "width": WIDTH, "patches": GRID[0] * GRID[1]},
        "temperature": TEMPERATURE, "opset": OPSET,
        "graphs": {"fp32": graphs},
        "parity": {},  # nothing to compare with: no torch model behind these graphs
        "versions": {"onnx": onnx.__version__, "numpy": np.__version__},
        "categories": {check_category_name(c): write_category(root, c, prompt_file, adaptation)
                       for c in categories},
    }
    Bundle(root, Manifest.from_dict(manifest, f"tiny bundle {str(root)!r}")).save_manifest()
    return Bundle.open(root)

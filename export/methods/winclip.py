"""WinCLIP / WinCLIP+ (docs/methods.md#winclip-zero-shot and #winclip-few-shot): exportable torch modules, options, text recipe
and eager reference.

Shapes: B images, C vision width, D joint embedding width, P = gh*gw patches, W_k windows of
scale k, M memory entries, N_n / N_a normal / anomalous prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipinspect.runtime.cli import int_list
from clipinspect.runtime.core.manifest import Adaptation as ManifestAdaptation
from clipinspect.runtime.core.manifest import Manifest, parse
from clipinspect.runtime.methods.winclip import WinClipSection

from ..prompt_format import expand
from ..text import ambiguity_filter, encode_texts, expand_prompts, normalized
from .base import HEADS, Built, Clip, ExportMethod, Option
from .common import (TEMPERATURE, Adaptation, ClipTower, adapted_prototypes, association,
                     class_score, eager_association, eager_class_score, eager_tokens, head_text,
                     text_input_names)

# Reciprocals of scores are clamped here so that a score of exactly 0 (a query identical to a
# reference) gives a harmonic mean of ~0 instead of 0 * inf = NaN inside the matrix product.
RECIPROCAL_FLOOR = 1e-30


def window_indices(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(W_k, k*k) int64 patch indices of every k x k window, stride 1, row-major order."""
    gh, gw = grid
    if not 1 <= k <= min(gh, gw):
        raise ValueError(f"window scale {k} does not fit the {gh}x{gw} patch grid")
    rows = torch.arange(gh - k + 1).repeat_interleave(gw - k + 1)
    cols = torch.arange(gw - k + 1).repeat(gh - k + 1)
    di = torch.arange(k).repeat_interleave(k)
    dj = torch.arange(k).repeat(k)
    return (rows[:, None] + di[None, :]) * gw + (cols[:, None] + dj[None, :])


def incidence(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(W_k, P) float32 window-by-patch incidence matrix (1 where the window holds the patch)."""
    idx = window_indices(grid, k)
    a = torch.zeros(idx.shape[0], grid[0] * grid[1])
    a.scatter_(1, idx, 1.0)
    return a


class WinClipEncoder(ClipTower):
    """images (B, 3, H, W) -> image_embedding (B, D), window_embeddings_k (B, W_k, D) per scale,
    patch_tokens (B, P, C).

    Wraps an open_clip VisionTransformer. Window sequences are [class token, the window's patch
    tokens] taken after patch + class + positional embedding (before ln_pre); all windows of one
    scale run through the transformer as one batch. In the last block only the class token's
    output is needed, so only its query, attention and MLP are computed (exactly the same value).
    """

    def __init__(self, visual: nn.Module, scales: tuple[int, ...]):
        super().__init__(visual)
        self.scales = tuple(int(k) for k in scales)
        for k in self.scales:
            self.register_buffer(f"windows_{k}", window_indices(self.grid, k) + 1, persistent=False)

    def output_names(self) -> list[str]:
        return ["image_embedding", *[f"window_embeddings_{k}" for k in self.scales], "patch_tokens"]

    def window_embeddings(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """tokens (B, 1 + P, C) -> (B, W_k, D)."""
        v = self.visual
        idx = getattr(self, f"windows_{k}")
        n_windows, n_patches = idx.shape
        patches = tokens[:, idx]                                            # (B, W, k*k, C)
        cls = tokens[:, :1].unsqueeze(1).expand(-1, n_windows, -1, -1)      # (B, W, 1, C)
        seq = torch.cat([cls, patches], dim=2).reshape(-1, 1 + n_patches, tokens.shape[-1])
        pooled = v.ln_post(self.transformer(v.ln_pre(seq), class_only=True)[:, 0])  # (B*W, C)
        return (pooled @ v.proj).reshape(tokens.shape[0], n_windows, -1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.visual
        tokens = self.embed_tokens(images)
        x = v.ln_post(self.transformer(v.ln_pre(tokens)))
        image_embedding = x[:, 0] @ v.proj
        windows = [self.window_embeddings(tokens, k) for k in self.scales]
        return (image_embedding, *windows, x[:, 1:])


def harmonic_to_patches(scores: torch.Tensor, incidence_wp: torch.Tensor, counts: torch.Tensor
                        ) -> torch.Tensor:
    """Window scores (B, W) -> patch scores (B, P): n(p) / sum over windows holding p of 1/s_w."""
    return counts / (scores.clamp_min(RECIPROCAL_FLOOR).reciprocal() @ incidence_wp)


class WinClipHead(nn.Module):
    """Scoring graph. Inputs (in this order):

    image_embedding (B, D), window_embeddings_k (B, W_k, D) per scale, [few-shot: patch_tokens
    (B, P, C)], text_prototypes (2, D) or with adaptation text_normal (N_n, D) and
    text_anomalous (N_a, D), [few-shot: memory_patch_tokens (M_p, C),
    memory_window_embeddings_k (M_k, D) per scale].

    Outputs: image_score (B,), anomaly_grid (B, gh, gw).
    """

    def __init__(self, grid: tuple[int, int], scales: tuple[int, ...], few_shot: bool,
                 adaptation: Adaptation | None = None):
        super().__init__()
        self.grid = tuple(grid)
        self.scales = tuple(scales)
        self.few_shot = few_shot
        self.adaptation = adaptation
        for k in self.scales:
            a = incidence(self.grid, k)
            self.register_buffer(f"incidence_{k}", a, persistent=False)
            self.register_buffer(f"counts_{k}", a.sum(dim=0), persistent=False)

    def input_names(self) -> list[str]:
        names = ["image_embedding", *[f"window_embeddings_{k}" for k in self.scales]]
        if self.few_shot:
            names.append("patch_tokens")
        names += text_input_names(self.adaptation)
        if self.few_shot:
            names += ["memory_patch_tokens", *[f"memory_window_embeddings_{k}" for k in self.scales]]
        return names

    def aggregate(self, window_scores: torch.Tensor, k: int) -> torch.Tensor:
        return harmonic_to_patches(window_scores, getattr(self, f"incidence_{k}"),
                                   getattr(self, f"counts_{k}"))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.input_names(), inputs))
        text = head_text(named, named["image_embedding"], self.adaptation)
        image_score = class_score(named["image_embedding"], text)                       # (B,)
        maps = [image_score[:, None].expand(-1, self.grid[0] * self.grid[1])]
        maps += [self.aggregate(class_score(named[f"window_embeddings_{k}"], text), k)
                 for k in self.scales]
        zero_shot = len(maps) / sum(m.clamp_min(RECIPROCAL_FLOOR).reciprocal() for m in maps)
        if not self.few_shot:
            return image_score, zero_shot.reshape(-1, *self.grid)
        few = [association(named["patch_tokens"], named["memory_patch_tokens"])]
        few += [self.aggregate(association(named[f"window_embeddings_{k}"],
                                           named[f"memory_window_embeddings_{k}"]), k)
                for k in self.scales]
        few_shot = sum(few) / len(few)                                                  # (B, P)
        score = (image_score + few_shot.max(dim=-1).values) * 0.5
        return score, ((zero_shot + few_shot) * 0.5).reshape(-1, *self.grid)



# ------------------------------------------------------------------------------ text recipe
def category_text(model, tokenizer, category: str, ensemble: dict,
                  descriptions: dict[str, list[str]] | None = None,
                  adaptation: dict | None = None) -> tuple[dict, dict]:
    """Arrays for ``text.npz`` and the prompt record for ``prompts.json`` of one category.

    descriptions: the category's entry of a prompt file ({"normal": [...], "anomalous": [...]}),
    appended to the ensemble's prompts of each state. adaptation: the bundle's adaptation record
    (or None); with it the ambiguity filter runs and the kept prompts' normalized embeddings are
    stored as the pools ``text_normal`` (N_n, D) and ``text_anomalous`` (N_a, D).

    prototypes (2, D): means of the raw embeddings per state (all prompts), rows [normal,
    anomalous].
    """
    normal, anomalous = expand_prompts(category, ensemble)
    extra = {s: expand((descriptions or {}).get(s, []), category) for s in ("normal", "anomalous")}
    normal, anomalous = normal + extra["normal"], anomalous + extra["anomalous"]
    e_normal = encode_texts(model, tokenizer, normal)
    e_anomalous = encode_texts(model, tokenizer, anomalous)
    prototypes = np.stack([e_normal.mean(0), e_anomalous.mean(0)]).astype(np.float32)
    arrays = {"prototypes": prototypes, "normal_embeddings": e_normal,
              "anomalous_embeddings": e_anomalous}
    record = {"category": category, "normal": normal, "anomalous": anomalous,
              "from_prompt_file": extra}
    if adaptation is not None:
        keep_n, keep_a = ambiguity_filter(e_normal, e_anomalous)
        for state, keep in (("normal", keep_n), ("anomalous", keep_a)):
            top_k = adaptation.get("top_k")
            if keep.sum() == 0 or (top_k and keep.sum() < top_k):
                raise ValueError(f"category {category!r}: the ambiguity filter kept "
                                 f"{int(keep.sum())} of {len(keep)} {state} prompts, fewer than "
                                 f"{'top-k ' + str(top_k) if top_k else 'one'}; add clearer "
                                 f"{state} descriptions to the prompt file or lower --top-k")
        arrays["text_normal"] = normalized(e_normal[keep_n]).astype(np.float32)
        arrays["text_anomalous"] = normalized(e_anomalous[keep_a]).astype(np.float32)
        record["dropped_by_ambiguity_filter"] = {
            "normal": [p for p, k in zip(normal, keep_n) if not k],
            "anomalous": [p for p, k in zip(anomalous, keep_a) if not k]}
    return arrays, record


# -------------------------------------------------------------------------- eager reference
def windows_of_scale(gh: int, gw: int, k: int) -> list[list[int]]:
    """Patch indices of every k x k window, stride 1, row-major."""
    return [[(r + i) * gw + (c + j) for i in range(k) for j in range(k)]
            for r in range(gh - k + 1) for c in range(gw - k + 1)]


@dataclass
class ReferenceFeatures:
    image_embedding: torch.Tensor          # (B, D)
    window_embeddings: dict[int, torch.Tensor]  # k -> (B, W_k, D)
    patch_tokens: torch.Tensor             # (B, P, C)
    patch_embeddings: torch.Tensor | None = None  # (B, P, D), patch-only method

    def image(self, i: int) -> "ReferenceFeatures":
        """The features of image i alone (batch of one)."""
        pick = slice(i, i + 1)
        return ReferenceFeatures(
            self.image_embedding[pick], {k: w[pick] for k, w in self.window_embeddings.items()},
            self.patch_tokens[pick],
            None if self.patch_embeddings is None else self.patch_embeddings[pick])


class WinClipReference:
    """Eager WinCLIP on an open_clip model (any dtype / device the model is on), the yardstick
    of the exported graphs: open_clip's own forward for the image embedding and patch tokens,
    each scale's windows built with an explicit loop and run through the whole transformer,
    window scores aggregated with scatter-adds; prompt adaptation image by image."""

    def __init__(self, model: torch.nn.Module, scales=(2, 3)):
        self.model = model
        self.visual = model.visual
        self.scales = tuple(scales)
        self.grid = tuple(int(g) for g in self.visual.grid_size)

    @classmethod
    def from_manifest(cls, model: torch.nn.Module, manifest: Manifest) -> "WinClipReference":
        return cls(model, manifest.section.scales)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> ReferenceFeatures:
        v = self.visual
        image_embedding = self.model.encode_image(images)
        previous = v.output_tokens
        v.output_tokens = True
        try:
            _, patch_tokens = v(images)
        finally:
            v.output_tokens = previous
        tokens = eager_tokens(v, images)
        windows = {}
        for k in self.scales:
            seqs = [torch.cat([tokens[:, :1], tokens[:, [p + 1 for p in w]]], dim=1)
                    for w in windows_of_scale(*self.grid, k)]
            seq = torch.stack(seqs, dim=1)                      # (B, W, 1 + k*k, C)
            b, n = seq.shape[:2]
            out = v.transformer(v.ln_pre(seq.flatten(0, 1)))
            pooled = v.ln_post(out[:, 0]) @ v.proj
            windows[k] = pooled.reshape(b, n, -1)
        return ReferenceFeatures(image_embedding, windows, patch_tokens)

    def harmonic(self, window_scores: torch.Tensor, k: int) -> torch.Tensor:
        """(B, W) -> (B, P): n(p) / sum_{w contains p} 1/s_w, non-finite results set to 0."""
        b = window_scores.shape[0]
        p = self.grid[0] * self.grid[1]
        inv_sum = torch.zeros(b, p, dtype=window_scores.dtype, device=window_scores.device)
        count = torch.zeros(p, dtype=window_scores.dtype, device=window_scores.device)
        for w, patches in enumerate(windows_of_scale(*self.grid, k)):
            inv_sum[:, patches] += 1.0 / window_scores[:, w:w + 1]
            count[patches] += 1
        out = count / inv_sum
        return torch.where(torch.isfinite(out), out, torch.zeros_like(out))

    class_score = staticmethod(eager_class_score)
    association = staticmethod(eager_association)

    def per_image(self, f: ReferenceFeatures, prototypes: torch.Tensor,
                  memory: ReferenceFeatures | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``score`` image by image with each image's own (2, D) prototypes (B, 2, D)."""
        parts = [self.score(f.image(i), prototypes[i], memory) for i in range(len(prototypes))]
        return tuple(torch.cat(p) for p in zip(*parts))

    @torch.no_grad()
    def score(self, f: ReferenceFeatures, prototypes: torch.Tensor,
              memory: ReferenceFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image_score (B,), grid map (B, gh, gw). ``prototypes``: (2, D), or (B, 2, D) per
        image (prompt adaptation). ``memory`` holds the K reference images' features (few-shot)
        or is None (zero-shot)."""
        if prototypes.dim() == 3:
            return self.per_image(f, prototypes, memory)
        s_img = self.class_score(f.image_embedding, prototypes)
        per_scale = [self.harmonic(self.class_score(f.window_embeddings[k], prototypes), k)
                     for k in self.scales]
        inv = 1.0 / s_img[:, None] + sum(1.0 / m for m in per_scale)
        zero_shot = (1 + len(per_scale)) / inv
        if memory is None:
            return s_img, zero_shot.reshape(-1, *self.grid)
        mem_patches = memory.patch_tokens.flatten(0, 1)
        few = [self.association(f.patch_tokens, mem_patches)]
        for k in self.scales:
            mem = memory.window_embeddings[k].flatten(0, 1)
            few.append(self.harmonic(self.association(f.window_embeddings[k], mem), k))
        few_shot = torch.stack(few).mean(0)
        score = (s_img + few_shot.max(dim=-1).values) / 2
        return score, ((zero_shot + few_shot) / 2).reshape(-1, *self.grid)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prototypes, size: tuple[int, int],
                 memory: ReferenceFeatures | None = None, adaptation: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, h, w) normalized -> image_score (B,), anomaly_map (B, H, W).

        prototypes: the category's (2, D) raw prototypes; with ``adaptation`` (the manifest's
        record: tau, top_k) the pair (text_normal (N_n, D), text_anomalous (N_a, D)) instead.
        """
        f = self.features(images)
        if adaptation is not None:
            prototypes = adapted_prototypes(f.image_embedding, *prototypes, adaptation["tau"],
                                            adaptation["top_k"])
        score, grid = self.score(f, prototypes, memory)
        amap = F.interpolate(grid[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return score, amap


# ----------------------------------------------------------------------------------- the unit
def recorded_options(options: dict) -> dict:
    """The method's options as the manifest records them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def scoring(adaptation: Adaptation | None) -> dict:
    """``Built``'s scoring entries of the methods scored against (adapted) text prototypes."""
    record = parse(ManifestAdaptation, adaptation.record(), "export", "adaptation") \
        if adaptation else None
    return {"adaptation": record, "temperature": TEMPERATURE}


def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    visual = clip.model.visual
    grid = tuple(int(g) for g in visual.grid_size)
    scales = tuple(sorted({int(k) for k in options["scales"]}))
    bad = [k for k in scales if not 1 <= k <= min(grid)]
    if bad:
        raise ValueError(f"window scale {bad[0]} does not fit the {grid[0]}x{grid[1]} patch grid; "
                         f"use scales from 1 to {min(grid)} (WinCLIP: 2,3)")
    encoder = WinClipEncoder(visual, scales).eval()
    heads = {name: WinClipHead(encoder.grid, scales, name == "head_fewshot", adaptation).eval()
             for name in HEADS}
    windows = {str(k): int(getattr(encoder, f"windows_{k}").shape[0]) for k in scales}
    section = WinClipSection(list(scales), windows, recorded_options({"scales": scales}))
    return Built(encoder, heads, section, **scoring(adaptation))


METHOD = ExportMethod(
    name="winclip",
    summary="windows + patches (WinCLIP / WinCLIP+, default)",
    options=(Option("scales", (2, 3), "winclip: window scales (default 2,3)",
                    type=int_list(1, "2,3")),),
    build=build, category_text=category_text, reference=WinClipReference)

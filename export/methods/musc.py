"""MuSc: mutual scoring of unlabeled images (Li et al., ICLR 2024; docs/methods.md#musc-mutual-
scoring-of-unlabeled-images): the exportable encoder, options, text record and the eager
reference of the published formulas.

The encoder graph emits what scoring needs: per feature layer l and aggregation degree r the
layer-normalised, r x r neighbourhood-averaged and L2-normalised patch features ``musc_<l>_r<r>``
(B, P, C), and the L2-normalised image embedding (B, D). The runtime
(clipinspect.runtime.methods.musc_scoring, numpy) does the mutual scoring, the maps and RsCIN.

Shapes: B images, C vision width, D joint width, P = gh*gw patches, N images in a pool.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipinspect.runtime.cli import int_list, positive_int
from clipinspect.runtime.core.manifest import Manifest
from clipinspect.runtime.methods.musc import (INTERVAL, MuscSection, default_layers,
                                              feature_name, interval_k)

from ..errors import log
from .aprillab import (AprilLabEncoder, activation_name, check_layers, model_activation,
                       resized_tower, set_activation, text_tower)
from .base import Built, Clip, ExportMethod, Option
from .common import Adaptation

# The published defaults per model (configs/musc.yaml): ViT-L-14-336 at 518 px with exact
# GELU (their open_clip rebuilds the model from its JSON config, which has no quick_gelu flag)
# and 1-based blocks 6, 12, 18, 24. Every other model: its own size and activation, blocks at
# the quarter points of the depth (our choice, the same rule; docs/methods.md).
PUBLISHED = {"ViT-L-14-336": {"image_size": 518, "activation": "gelu"}}
LN_EPS = 1e-5


def aggregate(tokens: torch.Tensor, grid: tuple[int, int], width: int, r_list: Sequence[int]
              ) -> list[torch.Tensor]:
    """(B, P, C) residual-stream patch tokens -> per r (B, P, C): layer norm over (P, C) jointly
    (the (C, h, w) map, eps 1e-5, no affine), zero padding by (r - 1) / 2 after the norm, the
    per-channel mean over each r x r neighbourhood with padded zeros counted, then each patch
    vector divided by its L2 norm."""
    p, c = int(grid[0] * grid[1]), int(width)  # Python numbers: constants of the graph
    b = tokens.shape[0]
    normed = F.layer_norm(tokens, (p, c), eps=LN_EPS)
    out = []
    for r in r_list:
        if r == 1:
            x = normed
        else:
            m = normed.transpose(1, 2).reshape(b, c, *grid)
            m = F.avg_pool2d(m, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)
            x = m.reshape(b, c, p).transpose(1, 2)
        out.append(x / x.norm(dim=-1, keepdim=True))
    return out


class MuscEncoder(AprilLabEncoder):
    """images (B, 3, H, W) -> image_embedding (B, D) L2-normalised, then ``musc_<l>_r<r>``
    (B, P, C) per layer l (1-based block, residual stream after it) and r, layer-major."""

    def __init__(self, visual: nn.Module, layers: Sequence[int], r_list: Sequence[int],
                 image_size: tuple[int, int] | None = None):
        super().__init__(visual, layers, image_size)
        self.r_list = tuple(int(r) for r in r_list)

    def output_names(self) -> list[str]:
        return ["image_embedding", *[feature_name(n, r) for n in self.layers for r in self.r_list]]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, *levels = super().forward(images)
        width = int(self.visual.conv1.out_channels)
        features = [f for x in levels for f in aggregate(x, self.grid, width, self.r_list)]
        return (embedding / embedding.norm(dim=-1, keepdim=True), *features)


# -------------------------------------------------------------------------- eager reference
class MuscReference:
    """The published MuSc, eagerly, as its code reads (models/musc.py and models/modules/):
    open_clip's ``forward_intermediates`` on a copy of the tower with its positional embedding
    resampled by open_clip when the size differs; LNAMD with ``nn.LayerNorm([C, h, w])``, the
    PatchCore unfold and ``adaptive_avg_pool1d``; MSM per image with ``torch.cdist`` (here in
    float64, see docs/methods.md), the 0-30 % interval average; means over layers then r;
    bilinear upsampling with align_corners; RsCIN's MMO. Independent of the exported modules."""

    def __init__(self, model: nn.Module, layers: Sequence[int], r_list: Sequence[int],
                 image_size: int | None = None, activation: str | None = None,
                 rscin_k: Sequence[int] = (1, 2, 3)):
        v, self.grid, self.size = resized_tower(model, image_size, activation)
        self.visual, self.layers, self.r_list = v.eval(), tuple(layers), tuple(r_list)
        self.rscin_k = tuple(rscin_k)

    @classmethod
    def from_manifest(cls, model: nn.Module, manifest: Manifest) -> "MuscReference":
        s = manifest.section
        return cls(model, s.layers, s.r_list, manifest.preprocess.size[0], s.activation,
                   s.rscin_k)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> normalised image embeddings (N, D), per layer the tokens (N, 1 + P, C)."""
        out = self.visual.forward_intermediates(images, indices=[n - 1 for n in self.layers],
                                                output_fmt="NLC", intermediates_only=False)
        emb = out["image_features"] if "image_features" in out else self.visual(images)
        inter = out["image_intermediates"]
        if inter[0].shape[1] == self.grid[0] * self.grid[1]:  # class token not returned
            inter = [torch.cat([torch.zeros_like(x[:, :1]), x], 1) for x in inter]
        return emb / emb.norm(dim=-1, keepdim=True), inter

    def lnamd(self, tokens: list[torch.Tensor], r: int) -> list[torch.Tensor]:
        """Their LNAMD._embed then ``features /= features.norm``: per layer (N, P, C)."""
        out = []
        for feature in tokens:
            feature = feature[:, 1:, :]
            n, p, c = feature.shape
            h = int(np.sqrt(p))
            feature = feature.reshape(n, h, h, c).permute(0, 3, 1, 2)
            feature = nn.LayerNorm([c, h, h], eps=LN_EPS, elementwise_affine=False)(feature)
            pad = (r - 1) // 2
            unfolded = nn.Unfold(kernel_size=r, stride=1, padding=pad)(feature)
            unfolded = unfolded.reshape(n, c, r, r, -1).permute(0, 4, 1, 2, 3)
            flat = unfolded.reshape(n * p, 1, -1)
            pooled = F.adaptive_avg_pool1d(flat, c).squeeze(1).reshape(n, p, c)
            out.append(pooled / pooled.norm(dim=-1, keepdim=True))
        return out

    @staticmethod
    def msm(z: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        """Their compute_scores_fast per image, distances in float64: z (N, P, C) -> (N, P)
        scores against the other N - 1 images; with ``pool`` (K, P, C) each image of z is
        scored against the pool instead (a line's rolling pool)."""
        z = z.double()
        rows = []
        for i in range(len(z)):
            ref = torch.cat([z[:i], z[i + 1:]]) if pool is None else pool.double()
            d = torch.cdist(z[i:i + 1], ref.reshape(-1, z.shape[-1]))
            d = d.reshape(z.shape[1], len(ref), z.shape[1]).min(-1).values
            k = interval_k(d.shape[1])
            rows.append(torch.topk(d, k, largest=False).values.mean(1))
        return torch.stack(rows)

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor, pool_images: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (N, P) float64 patch scores (mean over layers, then over r), embeddings."""
        emb, tokens = self.tokens(images)
        pool_tokens = None if pool_images is None else self.tokens(pool_images)[1]
        per_r = []
        for r in self.r_list:
            z = self.lnamd(tokens, r)
            zp = [None] * len(z) if pool_tokens is None else self.lnamd(pool_tokens, r)
            per_r.append(torch.stack([self.msm(a, b) for a, b in zip(z, zp)]).mean(0))
        return torch.stack(per_r).mean(0), emb

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, rscin: bool = True,
                 pool_images: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W), the pool (batch mode) or scored against ``pool_images`` ->
        (image scores (N,), anomaly maps (N, H, W) float64 at the input size)."""
        scores, emb = self.patch_scores(images, pool_images)
        maps = F.interpolate(scores.reshape(-1, 1, *self.grid), size=self.size,
                             mode="bilinear", align_corners=True)[:, 0]
        peak = maps.reshape(len(maps), -1).max(-1).values
        if not rscin or pool_images is not None:
            return peak, maps
        return self.rscin(peak.numpy(), emb.numpy()), maps

    def rscin(self, peak: np.ndarray, emb: np.ndarray) -> torch.Tensor:
        """Their RsCIN and MMO: min-max normalised scores smoothed over each image's k most
        similar images (raw dot products of the embeddings, the image itself included)."""
        scores = torch.tensor((peak - peak.min()) / (peak.max() - peak.min())).float()
        w = torch.tensor(emb @ emb.T).float()
        out = []
        for k in self.rscin_k:
            _, low = torch.topk(w, w.shape[0] - k, largest=False, sorted=True)
            masked = w.clone()
            for i in range(w.shape[0]):
                masked[i, low[i]] = 0
            d = torch.zeros_like(w)
            for i in range(w.shape[0]):
                d[i, i] = 1 / masked[i, :].sum()
            out.append((d @ masked) @ scores.unsqueeze(-1))
        return torch.cat(out, -1).mean(-1)


# ----------------------------------------------------------------------------------- the unit
def category_text(model, tokenizer, category: str, ensemble: dict,
                  descriptions: dict | None = None, adaptation: dict | None = None
                  ) -> tuple[dict, dict]:
    """MuSc uses no text: the category's text file holds zero prototypes (2, D), which nothing
    reads, so that every bundle's categories have the same files."""
    if descriptions or adaptation:
        raise ValueError("--method musc scores without text: it takes neither prompt files nor "
                         "prompt adaptation")
    dim = int(model.visual.output_dim)
    return ({"prototypes": np.zeros((2, dim), np.float32)},
            {"category": category, "normal": [], "anomalous": [],
             "note": "musc scores without text; the prototypes are zeros and unused"})


def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    visual = clip.model.visual
    depth = len(visual.transformer.resblocks)
    published = PUBLISHED.get(clip.name, {})
    layers = check_layers(options["layers"] or default_layers(depth), depth)
    r_list = check_r_list(options["r_list"])
    activation = options["activation"] or published.get("activation") \
        or model_activation(clip.model)
    set_activation(clip.model, activation)
    size = options["image_size"] or published.get("image_size")
    encoder = MuscEncoder(visual, layers, r_list, None if size is None else (size, size)).eval()
    rscin_k = [int(k) for k in options["rscin_k"]]
    log(f"      {encoder.image_size[0]}x{encoder.image_size[1]}, layers {list(layers)}, "
        f"r {list(r_list)}, RsCIN k {rscin_k}, pool {options['pool_size']}")
    own = visual.image_size
    own = [own, own] if isinstance(own, int) else [int(s) for s in own]
    section = MuscSection(list(layers), list(r_list), rscin_k, INTERVAL, activation,
                          int(options["pool_size"]), {k: v for k, v in options.items()},
                          {"positional_embedding": (
                              "as trained" if own == list(encoder.image_size) else
                              f"resampled bicubically (antialiased) from {own[0]}x{own[1]}")})
    return Built(encoder, {}, section)


def check_r_list(r_list: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(r) for r in r_list)
    if not out or any(r < 1 or r % 2 == 0 for r in out) or len(set(out)) != len(out):
        raise ValueError(f"aggregation degrees {list(r_list)}: expected distinct odd whole "
                         "numbers >= 1 (published: 1,3,5)")
    return out


def check_options(options: dict) -> None:
    check_r_list(options["r_list"])
    if any(int(k) < 1 for k in options["rscin_k"]):
        raise ValueError(f"--rscin-k {options['rscin_k']}: expected whole numbers >= 1")
    if int(options["pool_size"]) < 4:
        raise ValueError(f"--pool-size {options['pool_size']}: a pool needs at least 4 parts "
                         f"(the {int(INTERVAL * 100)} % interval of fewer others is empty)")


METHOD = ExportMethod(
    name="musc",
    summary="MuSc: mutual scoring of unlabeled images, no prompts and no reference images",
    options=(
        Option("layers", None, "musc: 1-based blocks whose residual stream is a feature layer "
               "(default: quarter points of the depth, 6,12,18,24 for 24 blocks as published)",
               type=int_list(1, "6,12,18,24")),
        Option("r_list", [1, 3, 5], "musc: aggregation degrees r of LNAMD (default 1,3,5)",
               type=int_list(1, "1,3,5"), metavar="R,..."),
        Option("rscin_k", [1, 2, 3], "musc: RsCIN neighbourhood sizes (default 1,2,3; "
               "published 1,8,9 for VisA)", type=int_list(1, "1,2,3"), metavar="K,..."),
        Option("pool_size", 100, "musc: parts a line's rolling pool keeps (streaming mode, "
               "default 100)", type=positive_int, metavar="K"),
        Option("image_size", None, "musc: square input side if not the model's own (default 518 "
               "for ViT-L-14-336 as published)", type=positive_int, metavar="PIXELS"),
        Option("activation", None, "musc: MLP activation, gelu or quick_gelu (default gelu for "
               "ViT-L-14-336 as published, else the model config's)", type=activation_name,
               metavar="NAME")),
    build=build, category_text=category_text, reference=MuscReference, ensemble="winclip",
    prompt_adaptation=False, check=check_options, text_tower=text_tower)

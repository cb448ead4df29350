"""Patch-only method: the training-free fine-grained aligner (docs/methods.md#patch-only-method-our-formulation, our
formulation): exportable torch modules, options and eager reference.

One encoder pass, no window passes. Besides the ordinary CLIP image embedding, the encoder
returns dense patch embeddings in the joint image-text space, so that each patch can be scored
against the (adapted) text prototypes exactly like the image embedding.

Dense patch embeddings, the formula (``dense_blocks`` = n, default 1):

    x_j                   input of block j of the ordinary forward pass (after ln_pre), (B, 1+P, C)
    a_j = out_proj_j(VV_j(ln_1_j(x_j)))     for each of the last n blocks j
    VV(h) = per head softmax(v v^T / sqrt(d)) v, with v = the block's value projection of h
    patch_embeddings = ln_post(sum_j a_j)[:, 1:] @ proj                       (B, P, D)

The dense path keeps neither the residual stream nor the MLPs: it is the sum of the value-value
attention outputs of the last n blocks, read from the ordinary pass (which is computed anyway for
the image embedding), then the model's own ``ln_post`` and ``proj``. Value-value attention lets
each patch attend to patches with similar content instead of to the globally salient tokens that
query-key attention of CLIP's last blocks favours, which is the path training-free dense CLIP
methods (MaskCLIP, CLIP Surgery, SCLIP and relatives) take. The class token takes part as a key.

Shapes: B images, C vision width, D joint width, P patches, M memory entries.
The text recipe is WinCLIP's (ensemble, prompt files, ambiguity filter with adaptation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipinspect.runtime.cli import positive_int
from clipinspect.runtime.core.manifest import Manifest
from clipinspect.runtime.methods.patch import PatchSection

from .base import HEADS, Built, Clip, ExportMethod, Option
from .common import (Adaptation, ClipTower, association, class_score, eager_tokens, head_text,
                     text_input_names)
from .winclip import (ReferenceFeatures, WinClipReference, category_text, recorded_options,
                      scoring)


def value_value_attention(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(N, L, C) block input after ln_1 -> (N, L, C): out_proj(softmax(v v^T / sqrt(d)) v)."""
    attn = block.attn
    n_tokens, width = h.shape[1], h.shape[2]
    heads = attn.num_heads
    dim = width // heads
    w, b = attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:]
    v = torch.nn.functional.linear(h, w, b).reshape(-1, n_tokens, heads, dim).transpose(1, 2)
    weights = ((v * dim ** -0.5) @ v.transpose(-2, -1)).softmax(dim=-1)       # (N, H, L, L)
    out = (weights @ v).transpose(1, 2).reshape(-1, n_tokens, width)
    return torch.nn.functional.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class PatchEncoder(ClipTower):
    """images (B, 3, H, W) -> image_embedding (B, D), patch_embeddings (B, P, D),
    patch_tokens (B, P, C).

    image_embedding and patch_tokens (last-block tokens after ln_post, not projected: the
    WinCLIP+ few-shot features) are those of the ordinary forward pass; patch_embeddings is the
    dense value-value path of the module docstring.
    """

    def __init__(self, visual: nn.Module, dense_blocks: int = 1):
        super().__init__(visual)
        depth = len(visual.transformer.resblocks)
        if not 1 <= dense_blocks <= depth:
            raise ValueError(f"dense_blocks {dense_blocks} must be between 1 and the model's "
                             f"{depth} blocks")
        self.dense_blocks = int(dense_blocks)

    @staticmethod
    def output_names() -> list[str]:
        return ["image_embedding", "patch_embeddings", "patch_tokens"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.ln_pre(self.embed_tokens(images))
        blocks = v.transformer.resblocks
        first_dense = len(blocks) - self.dense_blocks
        dense = None
        for i, block in enumerate(blocks):
            if i >= first_dense:
                a = value_value_attention(block, block.ln_1(x))
                dense = a if dense is None else dense + a
            x = self.block(block, x)
        x = v.ln_post(x)
        patch_embeddings = v.ln_post(dense[:, 1:]) @ v.proj
        return x[:, 0] @ v.proj, patch_embeddings, x[:, 1:]


class PatchHead(nn.Module):
    """Scoring graph of the patch-only method. Inputs (in this order):

    image_embedding (B, D), patch_embeddings (B, P, D), [few-shot: patch_tokens (B, P, C)],
    text_prototypes (2, D) or with adaptation text_normal (N_n, D) and text_anomalous (N_a, D),
    [few-shot: memory_patch_tokens (M, C)].

    Zero-shot: image score ``s = class_score(v)``, map ``M0(p) = class_score(patch_embedding_p)``.
    Few-shot adds WinCLIP+'s patch term ``MF(p) = min_m (1 - cos(patch_token_p, m)) / 2``:
    map ``(M0 + MF) / 2``, image score ``(s + max MF) / 2``.
    Outputs: image_score (B,), anomaly_grid (B, gh, gw).
    """

    def __init__(self, grid: tuple[int, int], few_shot: bool, adaptation: Adaptation | None = None):
        super().__init__()
        self.grid = tuple(grid)
        self.few_shot = few_shot
        self.adaptation = adaptation

    def input_names(self) -> list[str]:
        names = ["image_embedding", "patch_embeddings"]
        if self.few_shot:
            names.append("patch_tokens")
        names += text_input_names(self.adaptation)
        if self.few_shot:
            names.append("memory_patch_tokens")
        return names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.input_names(), inputs))
        text = head_text(named, named["image_embedding"], self.adaptation)
        image_score = class_score(named["image_embedding"], text)                       # (B,)
        zero_shot = class_score(named["patch_embeddings"], text)                        # (B, P)
        if not self.few_shot:
            return image_score, zero_shot.reshape(-1, *self.grid)
        few_shot = association(named["patch_tokens"], named["memory_patch_tokens"])     # (B, P)
        score = (image_score + few_shot.max(dim=-1).values) * 0.5
        return score, ((zero_shot + few_shot) * 0.5).reshape(-1, *self.grid)


# -------------------------------------------------------------------------- eager reference
class PatchReference(WinClipReference):
    """Eager patch-only method on an open_clip model: open_clip's own blocks for the ordinary
    pass, value-value attention head by head."""

    def __init__(self, model: torch.nn.Module, dense_blocks: int = 1):
        super().__init__(model, scales=())
        self.dense_blocks = dense_blocks

    @classmethod
    def from_manifest(cls, model: torch.nn.Module, manifest: Manifest) -> "PatchReference":
        return cls(model, manifest.section.dense_blocks)

    @staticmethod
    def value_value(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        width = h.shape[-1]
        d = width // attn.num_heads
        v = F.linear(h, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
        heads = []
        for i in range(attn.num_heads):
            vh = v[..., i * d:(i + 1) * d]                                   # (B, L, d)
            heads.append(torch.softmax(vh @ vh.transpose(1, 2) / d ** 0.5, dim=-1) @ vh)
        return attn.out_proj(torch.cat(heads, dim=-1))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> ReferenceFeatures:
        f = super().features(images)
        v = self.visual
        x = v.ln_pre(eager_tokens(v, images))
        blocks = list(v.transformer.resblocks)
        dense = torch.zeros_like(x)
        for i, block in enumerate(blocks):
            if i >= len(blocks) - self.dense_blocks:
                dense = dense + self.value_value(block, block.ln_1(x))
            x = block(x)
        f.patch_embeddings = v.ln_post(dense[:, 1:]) @ v.proj
        return f

    @torch.no_grad()
    def score(self, f: ReferenceFeatures, prototypes: torch.Tensor,
              memory: ReferenceFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if prototypes.dim() == 3:
            return self.per_image(f, prototypes, memory)
        s_img = self.class_score(f.image_embedding, prototypes)
        zero_shot = self.class_score(f.patch_embeddings, prototypes)
        if memory is None:
            return s_img, zero_shot.reshape(-1, *self.grid)
        few_shot = self.association(f.patch_tokens, memory.patch_tokens.flatten(0, 1))
        score = (s_img + few_shot.max(dim=-1).values) / 2
        return score, ((zero_shot + few_shot) / 2).reshape(-1, *self.grid)


# ----------------------------------------------------------------------------------- the unit
def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    encoder = PatchEncoder(clip.model.visual, int(options["dense_blocks"])).eval()
    heads = {name: PatchHead(encoder.grid, name == "head_fewshot", adaptation).eval()
             for name in HEADS}
    section = PatchSection(int(options["dense_blocks"]), recorded_options(options))
    return Built(encoder, heads, section, **scoring(adaptation))


METHOD = ExportMethod(
    name="patch",
    summary="patch-only, one encoder pass, dense value-value patch embeddings",
    options=(Option("dense_blocks", 1, "patch and alfa: last blocks whose value-value attention "
                    "makes the patch embeddings (default 1)", type=positive_int, metavar="N"),),
    build=build, category_text=category_text, reference=PatchReference)

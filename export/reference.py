"""Plain PyTorch eager evaluation of every method, written straight from METHODS.md.

This is the yardstick, not the exported code: it uses open_clip's own forward for the image
embedding and patch tokens, builds each scale's windows with an explicit loop (as published
implementations do) and runs them through the whole transformer scale by scale, and aggregates
window scores with scatter-adds rather than a matrix product. The patch-only method's dense path
runs open_clip's own blocks and computes value-value attention head by head; prompt adaptation
is computed image by image. Tests and benchmarks compare the exported graphs against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07


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


def adapted_prototypes(image_embedding: torch.Tensor, text_normal: torch.Tensor,
                       text_anomalous: torch.Tensor, tau: float, top_k: int | None
                       ) -> torch.Tensor:
    """(B, D) image embeddings, prompt pools (N_n, D), (N_a, D) -> (B, 2, D) per-image
    [normal, anomalous] prototypes (METHODS.md section 5), one image and one state at a time."""
    out = []
    for v in image_embedding:
        rows = []
        for pool in (text_normal, text_anomalous):
            t = F.normalize(pool, dim=-1)
            r = F.cosine_similarity(v[None], t, dim=-1)                 # (N,)
            chosen = torch.arange(len(r))
            if top_k is not None:
                chosen = (r >= torch.sort(r, descending=True).values[top_k - 1]).nonzero()[:, 0]
            w = torch.softmax(r[chosen] / tau, dim=0)
            rows.append(F.normalize((w[:, None] * t[chosen]).sum(0), dim=-1))
        out.append(torch.stack(rows))
    return torch.stack(out)


class WinClipReference:
    """Eager WinCLIP on an open_clip model (any dtype / device the model is on)."""

    def __init__(self, model: torch.nn.Module, scales=(2, 3)):
        self.model = model
        self.visual = model.visual
        self.scales = tuple(scales)
        self.grid = tuple(int(g) for g in self.visual.grid_size)

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
        # Tokens after patch + class + positional embedding, before ln_pre (as open_clip's _embeds).
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                          dtype=x.dtype, device=x.device)
        tokens = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
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

    @staticmethod
    def class_score(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        cos_normal = F.cosine_similarity(x, prototypes[0].expand_as(x), dim=-1)
        cos_anomalous = F.cosine_similarity(x, prototypes[1].expand_as(x), dim=-1)
        return torch.stack([cos_normal, cos_anomalous], -1).div(TEMPERATURE).softmax(-1)[..., 1]

    @staticmethod
    def association(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(x, dim=-1) @ F.normalize(memory, dim=-1).T
        return ((1 - cos) / 2).min(dim=-1).values

    @torch.no_grad()
    def score(self, f: ReferenceFeatures, prototypes: torch.Tensor,
              memory: ReferenceFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> image_score (B,), grid map (B, gh, gw). ``prototypes``: (2, D), or (B, 2, D) per
        image (prompt adaptation). ``memory`` holds the K reference images' features (few-shot)
        or is None (zero-shot)."""
        if prototypes.dim() == 3:
            per_image = [self.score(f.image(i), prototypes[i], memory)
                         for i in range(len(prototypes))]
            return tuple(torch.cat(parts) for parts in zip(*per_image))
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


class PatchReference(WinClipReference):
    """Eager patch-only method (export/patch_torch.py documents the formula) on an open_clip
    model: open_clip's own blocks for the ordinary pass, value-value attention head by head."""

    def __init__(self, model: torch.nn.Module, dense_blocks: int = 1):
        super().__init__(model, scales=())
        self.dense_blocks = dense_blocks

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
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                          dtype=x.dtype, device=x.device)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
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
            per_image = [self.score(f.image(i), prototypes[i], memory)
                         for i in range(len(prototypes))]
            return tuple(torch.cat(parts) for parts in zip(*per_image))
        s_img = self.class_score(f.image_embedding, prototypes)
        zero_shot = self.class_score(f.patch_embeddings, prototypes)
        if memory is None:
            return s_img, zero_shot.reshape(-1, *self.grid)
        few_shot = self.association(f.patch_tokens, memory.patch_tokens.flatten(0, 1))
        score = (s_img + few_shot.max(dim=-1).values) / 2
        return score, ((zero_shot + few_shot) / 2).reshape(-1, *self.grid)

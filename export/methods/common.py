"""Torch building blocks every scoring method shares: the CLIP tower wrapper the encoders are
built from, normalization, class score, contextual prompt adaptation (docs/methods.md#contextual-prompt-adaptation-our-formulation),
nearest-neighbour association; and their plain eager counterparts for the references.

Shapes: B images, C vision width, D joint embedding width, L tokens, P = gh*gw patches, M memory
entries, N_n / N_a normal / anomalous prompts. Everything here is traced into ONNX; nothing per
product is baked in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.07


class ClipTower(nn.Module):
    """The pieces of an open_clip VisionTransformer every encoder here is built from: token
    embedding and residual blocks, with attention written batch-first from the blocks' weights."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        check_supported(visual)
        self.visual = visual
        self.grid = tuple(int(g) for g in visual.grid_size)

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + P, C): patch embedding, class token, positional embedding."""
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)

    #: Trace attention as onnxruntime's fused operator (com.microsoft MultiHeadAttention)
    #: instead of standard ONNX ops; the exporter sets it for the onnxruntime-only graph.
    fused_attention: bool = False

    def attention(self, block: nn.Module, h: torch.Tensor, class_only: bool = False
                  ) -> torch.Tensor:
        """Multi-head self-attention of ``block`` on h (N, L, C) -> (N, L or 1, C).

        Same weights and value as open_clip's nn.MultiheadAttention, written batch-first so the
        exported graph carries two transposes per block instead of the eight of torch's
        sequence-first implementation. With ``class_only`` only the class token queries. The
        width is a Python number, so the class-only slices of the projection weights are
        constants of the graph (folded at export, quantized like every other weight).
        """
        attn = block.attn
        n_tokens, width = h.shape[1], int(attn.embed_dim)
        heads = attn.num_heads
        dim = width // heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        if self.fused_attention:
            if class_only:
                q = F.linear(h[:, :1], w[:width], b[:width])
                k, v = F.linear(h, w[width:], b[width:]).chunk(2, dim=-1)
            else:
                q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
            return F.linear(FusedAttention.apply(q, k, v, heads), attn.out_proj.weight,
                            attn.out_proj.bias)
        if class_only:
            q = F.linear(h[:, :1], w[:width], b[:width]).reshape(-1, 1, heads, dim).transpose(1, 2)
            kv = F.linear(h, w[width:], b[width:]).reshape(-1, n_tokens, 2, heads, dim)
            kv = kv.permute(2, 0, 3, 1, 4)                              # (2, N, H, L, d)
            k, v = kv[0], kv[1]
        else:
            qkv = F.linear(h, w, b).reshape(-1, n_tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]                            # (N, H, L, d)
        weights = ((q * dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(-1, q.shape[2], width)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def block(self, block: nn.Module, x: torch.Tensor, class_only: bool = False) -> torch.Tensor:
        """One residual attention block (N, L, C) -> (N, L, C), or (N, 1, C) with class_only."""
        attended = self.attention(block, block.ln_1(x), class_only)
        x = (x[:, :1] if class_only else x) + block.ls_1(attended)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def transformer(self, x: torch.Tensor, class_only: bool = False) -> torch.Tensor:
        """(N, L, C) after ln_pre -> all blocks; in the last only the class token if class_only."""
        blocks = self.visual.transformer.resblocks
        for i, block in enumerate(blocks):
            x = self.block(block, x, class_only and i == len(blocks) - 1)
        return x


class FusedAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v over ``heads`` heads: q (N, Lq, C), k and v (N, Lk, C) ->
    (N, Lq, C). In torch, the formula of ``ClipTower.attention``; traced into ONNX, one
    com.microsoft MultiHeadAttention node (onnxruntime's fused kernel, whose default scale is
    1/sqrt(d)), which replaces the reshapes, transposes, products and softmax of the standard
    graph."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int
                ) -> torch.Tensor:
        n, width = q.shape[0], q.shape[2]
        dim = width // heads

        def split(t: torch.Tensor) -> torch.Tensor:                   # (N, H, L, d)
            return t.reshape(n, t.shape[1], heads, dim).transpose(1, 2)

        weights = ((split(q) * dim ** -0.5) @ split(k).transpose(-2, -1)).softmax(dim=-1)
        return (weights @ split(v)).transpose(1, 2).reshape(n, q.shape[1], width)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # the output is shaped like the queries: (N, Lq, C)
        return out


def check_supported(visual: nn.Module) -> None:
    """The encoders need a plain class-token ViT; say clearly which part of another one is not."""
    problems = []
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding",
                                            "transformer", "ln_pre", "ln_post")):
        problems.append("not an open_clip VisionTransformer (timm or ResNet towers are not supported)")
    else:
        if getattr(visual, "attn_pool", None) is not None:
            problems.append("attentional pooling")
        if getattr(visual, "pool_type", "tok") != "tok":
            problems.append(f"pool_type {visual.pool_type!r} (needs 'tok')")
        if getattr(visual, "final_ln_after_pool", False):
            problems.append("final_ln_after_pool")
        if getattr(visual, "proj", None) is None:
            problems.append("no output projection")
        if not getattr(visual.transformer, "batch_first", True):
            problems.append("sequence-first transformer (open_clip >= 2.23 is batch-first)")
        block = visual.transformer.resblocks[-1]
        if not all(hasattr(block, a) for a in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")) \
                or hasattr(block, "ln_attn") or hasattr(block, "ln_1_kv"):
            problems.append(f"transformer block type {type(block).__name__}")
        elif not isinstance(block.attn, nn.MultiheadAttention) or block.attn.bias_k is not None \
                or block.attn.add_zero_attn or not block.attn._qkv_same_embed_dim \
                or block.attn.in_proj_bias is None:
            problems.append("attention other than plain nn.MultiheadAttention with biases")
    if problems:
        raise ValueError("this vision tower cannot be exported for WinCLIP: " + "; ".join(problems))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def class_score(x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Anomalous probability ``softmax([cos(x, t_n), cos(x, t_a)] / 0.07)[a]``.

    x (B, ..., D); text (2, D) normalized rows [normal, anomalous] shared by the batch, or
    (B, 2, D) per image (adapted prototypes). -> (B, ...).
    """
    x = normalize(x)
    if text.dim() == 2:
        logits = x @ text.T
    else:
        b, d = x.shape[0], x.shape[-1]
        logits = (x.reshape(b, -1, d) @ text.transpose(1, 2)).reshape(*x.shape[:-1], 2)
    return (logits / TEMPERATURE).softmax(dim=-1)[..., 1]


@dataclass(frozen=True)
class Adaptation:
    """Contextual prompt adaptation (docs/methods.md#per-image-prototypes, our formulation).

    tau: temperature of the relevance softmax within each state; top_k: keep only the k most
    relevant prompts of each state (ties at the k-th relevance are kept), None = all.
    """

    tau: float = 0.01
    top_k: int | None = None

    def record(self) -> dict:
        return {"kind": "contextual", "tau": self.tau, "top_k": self.top_k}


def contextual_prototype(image_embedding: torch.Tensor, pool: torch.Tensor, adaptation: Adaptation
                         ) -> torch.Tensor:
    """One state's per-image prototype.

    image_embedding (B, D); pool (N, D) prompt embeddings of the state -> (B, D) normalized:
    relevance ``r_i = cos(v, t_i)``, weights ``softmax(r / tau)`` over the (top-k) prompts,
    prototype = normalize(sum_i w_i normalize(t_i)).
    """
    pool = normalize(pool)
    relevance = normalize(image_embedding) @ pool.T                          # (B, N)
    if adaptation.top_k is not None:
        kth = relevance.topk(adaptation.top_k, dim=-1).values[:, -1:]
        relevance = relevance.masked_fill(relevance < kth, float("-inf"))
    weights = (relevance / adaptation.tau).softmax(dim=-1)
    return normalize(weights @ pool)


def text_input_names(adaptation: Adaptation | None) -> list[str]:
    """Head inputs carrying a category's text: the prototypes (2, D), or with adaptation the
    prompt pools text_normal (N_n, D) and text_anomalous (N_a, D)."""
    return ["text_normal", "text_anomalous"] if adaptation else ["text_prototypes"]


def head_text(named: dict[str, torch.Tensor], image_embedding: torch.Tensor,
              adaptation: Adaptation | None) -> torch.Tensor:
    """Normalized [normal, anomalous] text of the head's inputs: (2, D), or (B, 2, D) adapted to
    each image."""
    if adaptation is None:
        return normalize(named["text_prototypes"])
    return torch.stack([contextual_prototype(image_embedding, named["text_normal"], adaptation),
                        contextual_prototype(image_embedding, named["text_anomalous"], adaptation)],
                       dim=1)


def association(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, E) queries, (M, E) memory -> (B, N): min over memory of (1 - cos) / 2."""
    return ((1.0 - normalize(x) @ normalize(memory).T) * 0.5).min(dim=-1).values


# ----------------------------------------------------------- eager counterparts (references)
# Written straight from the formulas of docs/methods.md, on open_clip's own modules, one image or head at a time where
# that is how the formula reads: the yardstick the exported graphs are tested against.

def eager_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1 + P, C) tokens after patch + class + positional embedding, before
    ln_pre (as open_clip's own forward builds them)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1],
                                                           dtype=x.dtype, device=x.device)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def eager_class_score(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """x (..., D), prototypes (2, D) raw -> (...) anomalous probability, cosine by cosine."""
    cos_normal = F.cosine_similarity(x, prototypes[0].expand_as(x), dim=-1)
    cos_anomalous = F.cosine_similarity(x, prototypes[1].expand_as(x), dim=-1)
    return torch.stack([cos_normal, cos_anomalous], -1).div(TEMPERATURE).softmax(-1)[..., 1]


def eager_association(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, E), (M, E) -> (B, N) min over memory of (1 - cos) / 2."""
    cos = F.normalize(x, dim=-1) @ F.normalize(memory, dim=-1).T
    return ((1 - cos) / 2).min(dim=-1).values


def adapted_prototypes(image_embedding: torch.Tensor, text_normal: torch.Tensor,
                       text_anomalous: torch.Tensor, tau: float, top_k: int | None
                       ) -> torch.Tensor:
    """(B, D) image embeddings, prompt pools (N_n, D), (N_a, D) -> (B, 2, D) per-image
    [normal, anomalous] prototypes (docs/methods.md#per-image-prototypes), one image and one state at a time."""
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

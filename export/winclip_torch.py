"""WinCLIP / WinCLIP+ as exportable torch modules (METHODS.md sections 1-2), and the scoring
functions every method shares: class score, contextual prompt adaptation (section 5),
harmonic aggregation, nearest-neighbour association.

Shapes: B images, C vision width, D joint embedding width, P = gh*gw patches, W_k windows of
scale k, M memory entries, N_n / N_a normal / anomalous prompts. Everything here is traced into
ONNX; nothing per product is baked in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.07
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

    @staticmethod
    def attention(block: nn.Module, h: torch.Tensor, class_only: bool = False) -> torch.Tensor:
        """Multi-head self-attention of ``block`` on h (N, L, C) -> (N, L or 1, C).

        Same weights and value as open_clip's nn.MultiheadAttention, written batch-first so the
        exported graph carries two transposes per block instead of the eight of torch's
        sequence-first implementation. With ``class_only`` only the class token queries.
        """
        attn = block.attn
        n_tokens, width = h.shape[1], h.shape[2]
        heads = attn.num_heads
        dim = width // heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
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


def check_supported(visual: nn.Module) -> None:
    """WinCLIP needs a plain class-token ViT; say clearly which part of another one is not."""
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
    """Contextual prompt adaptation (METHODS.md section 5, our formulation).

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


def harmonic_to_patches(scores: torch.Tensor, incidence_wp: torch.Tensor, counts: torch.Tensor
                        ) -> torch.Tensor:
    """Window scores (B, W) -> patch scores (B, P): n(p) / sum over windows holding p of 1/s_w."""
    return counts / (scores.clamp_min(RECIPROCAL_FLOOR).reciprocal() @ incidence_wp)


def association(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, N, E) queries, (M, E) memory -> (B, N): min over memory of (1 - cos) / 2."""
    return ((1.0 - normalize(x) @ normalize(memory).T) * 0.5).min(dim=-1).values


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


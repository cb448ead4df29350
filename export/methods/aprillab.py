"""AprilLab: multi-layer patch alignment with learned per-level projections (APRIL-GAN, VAND
2023, docs/methods.md#aprillab-after-april-gan): exportable torch modules, projection checkpoints, options, text
recipe and eager reference. Export, parity check and adapter training all use these modules, so
the trained and the exported formula are one.

Shapes: B images, C vision width, D joint embedding width (the text width), L feature levels,
P = gh*gw patches, (H, W) the model input size, M memory entries (K reference images x P).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipinspect.runtime.cli import int_list
from clipinspect.runtime.core.bundle import sha256_file
from clipinspect.runtime.core.manifest import Manifest

from ..errors import log
from ..text import encode_texts, expand_prompts
from .base import HEADS, Built, Clip, ExportMethod, Option
from .common import Adaptation, ClipTower, normalize

LOGIT_SCALE = 100.0
# APRIL-GAN saves {"trainable_linearlayer": state_dict} with keys fc.<i>.weight / fc.<i>.bias.
CHECKPOINT_KEY = "trainable_linearlayer"
RANDOM_PROJECTIONS_WARNING = (
    "WARNING: AprilLab projections are RANDOM (--adapters none): maps are meaningless until "
    "they are trained (clipinspect train-adapters). The bundle records it.")


def default_layers(depth: int) -> tuple[int, ...]:
    """Blocks (1-based) at the quarter points of the depth: 6,12,18,24 for 24 blocks as in
    APRIL-GAN, 3,6,9,12 for 12."""
    return tuple(sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)}))


def check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    out = tuple(sorted({int(n) for n in layers}))
    if not out or out[0] < 1 or out[-1] > depth:
        raise ValueError(f"feature layers {list(layers)} do not fit a {depth}-block transformer: "
                         f"use block numbers from 1 to {depth} (default {list(default_layers(depth))})")
    return out


def interpolate_positional_embedding(pos: torch.Tensor, old_grid: tuple[int, int],
                                     new_grid: tuple[int, int]) -> torch.Tensor:
    """(1 + P_old, C) -> (1 + P_new, C): the patch part resampled bicubically as a grid (the
    class position kept), so the model runs at another input size (APRIL-GAN: 336 -> 518)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    patches = pos[1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)          # (1, C, gh, gw)
    patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


class AprilLabEncoder(ClipTower):
    """images (B, 3, H, W) -> image_embedding (B, D), level_tokens_<n> (B, P, C) per level n.

    Level tokens are the residual stream after block n (no ln_post, no proj), class token
    dropped. ``image_size`` other than the model's own resamples the positional embedding.
    Reuses the tower's block math (same weights, same exported operators).
    """

    def __init__(self, visual: nn.Module, layers: Sequence[int],
                 image_size: tuple[int, int] | None = None):
        super().__init__(visual)
        depth = len(visual.transformer.resblocks)
        self.layers = check_layers(layers, depth)
        patch = tuple(int(p) for p in visual.patch_size)
        own = visual.image_size
        own = (own, own) if isinstance(own, int) else tuple(int(s) for s in own)
        size = own if image_size is None else tuple(int(s) for s in image_size)
        if size[0] % patch[0] or size[1] % patch[1]:
            raise ValueError(f"image size {size[0]}x{size[1]} is not a multiple of the patch size "
                             f"{patch[0]}; use e.g. {size[0] // patch[0] * patch[0]}")
        self.image_size = size
        self.grid = (size[0] // patch[0], size[1] // patch[1])
        pos = interpolate_positional_embedding(visual.positional_embedding.detach(),
                                               tuple(int(g) for g in visual.grid_size), self.grid)
        self.register_buffer("positional_embedding", pos.clone(), persistent=False)

    def output_names(self) -> list[str]:
        return ["image_embedding", *[f"level_tokens_{n}" for n in self.layers]]

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + P, C), with this encoder's (possibly resampled) positions."""
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v = self.visual
        blocks = v.transformer.resblocks
        x = v.ln_pre(self.embed_tokens(images))
        levels = []
        for n, block in enumerate(blocks, start=1):
            # Past the last level only the class token matters (for the image embedding).
            x = self.block(block, x, class_only=n == len(blocks) and n not in self.layers)
            if n in self.layers:
                levels.append(x[:, 1:])
        return (v.ln_post(x[:, 0]) @ v.proj, *levels)


class LevelProjections(nn.Module):
    """One Linear(C, D) per level. State dict keys ``fc.<i>.weight`` (D, C) and ``fc.<i>.bias``
    (D,), i = 0..L-1 in level order: the form of APRIL-GAN's ``trainable_linearlayer``."""

    def __init__(self, width: int, dim: int, levels: int):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width, dim) for _ in range(levels))

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """L x (B, P, C) -> L x (B, P, D)."""
        return [fc(x) for fc, x in zip(self.fc, tokens)]


def expected_keys(levels: int) -> list[str]:
    return [f"fc.{i}.{p}" for i in range(levels) for p in ("weight", "bias")]


def projection_state(checkpoint: Mapping, width: int, dim: int, levels: int) -> dict:
    """The projections' state dict out of a checkpoint: APRIL-GAN's ``{"trainable_linearlayer":
    {...}}`` (what train-adapters writes too) or the bare state dict. ValueError naming the keys
    found and expected when it does not fit L levels of Linear(C, D)."""
    state = checkpoint.get(CHECKPOINT_KEY, checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint entry {CHECKPOINT_KEY!r} is a {type(state).__name__}, not a "
                         "state dict")
    want = expected_keys(levels)
    found = sorted(state)
    if sorted(want) != found:
        raise ValueError(
            f"checkpoint does not hold {levels} per-level Linear({width}, {dim}) projections: "
            f"found keys {found[:12]}{' ...' if len(found) > 12 else ''}; expected {want} "
            f"(optionally under {CHECKPOINT_KEY!r}). Train them with 'clipinspect train-adapters' "
            "with the same --model and --layers")
    for i in range(levels):
        for p, shape in (("weight", (dim, width)), ("bias", (dim,))):
            got = tuple(state[f"fc.{i}.{p}"].shape)
            if got != shape:
                raise ValueError(f"checkpoint key fc.{i}.{p} has shape {list(got)}; this model "
                                 f"needs {list(shape)} (Linear({width}, {dim}) per level)")
    return {k: state[k].float() for k in want}


def text_prototypes(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """(N_n, D), (N_a, D) raw prompt embeddings -> (2, D) [t_n, t_a]: each prompt normalized,
    averaged per state, re-normalized."""
    return torch.stack([normalize(normalize(normal).mean(0)),
                        normalize(normalize(anomalous).mean(0))])


def to_pixels(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, P, K) per-patch values -> (B, K, H, W), bilinear with align_corners=True."""
    b, _, k = x.shape
    x = x.transpose(1, 2).reshape(b, k, *grid)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class AprilLabHead(nn.Module):
    """Scoring graph with the projections inside. Inputs (in this order):

    image_embedding (B, D), level_tokens_<n> (B, P, C) per level, text_prototypes (2, D),
    [few-shot: memory_level_tokens_<n> (M, C) per level].

    Outputs: image_score (B,), anomaly_grid (B, H, W): the map already at the input size (the
    per-level upsampling happens before the softmax, as the method defines).
    """

    def __init__(self, projections: LevelProjections, layers: Sequence[int],
                 grid: tuple[int, int], image_size: tuple[int, int], few_shot: bool):
        super().__init__()
        self.projections = projections
        self.layers = tuple(layers)
        self.grid = tuple(grid)
        self.image_size = tuple(image_size)
        self.few_shot = few_shot

    def input_names(self) -> list[str]:
        levels = [f"level_tokens_{n}" for n in self.layers]
        names = ["image_embedding", *levels, "text_prototypes"]
        return names + ([f"memory_{n}" for n in levels] if self.few_shot else [])

    def level_probabilities(self, levels: Sequence[torch.Tensor], text: torch.Tensor
                            ) -> list[torch.Tensor]:
        """L x (B, P, C), text (2, D) or per image (B, 2, D) -> L x (B, 2, H, W) [normal,
        anomalous] probabilities: softmax of 100 * normalize(W_l x_l) . [t_n, t_a], upsampled
        before the softmax."""
        text = normalize(text).transpose(-1, -2)
        return [to_pixels(LOGIT_SCALE * normalize(z) @ text, self.grid, self.image_size
                          ).softmax(dim=1) for z in self.projections(levels)]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.input_names(), inputs))
        text = normalize(named["text_prototypes"])
        levels = [named[f"level_tokens_{n}"] for n in self.layers]
        logits = LOGIT_SCALE * normalize(named["image_embedding"]) @ text.T
        image_score = logits.softmax(dim=-1)[:, 1]
        amap = sum(p[:, 1] for p in self.level_probabilities(levels, text))
        if self.few_shot:
            for n, x in zip(self.layers, levels):
                memory = named[f"memory_level_tokens_{n}"]
                distance = (1.0 - normalize(x) @ normalize(memory).T).min(dim=-1).values
                amap = amap + to_pixels(distance[..., None], self.grid, self.image_size)[:, 0]
        return image_score, amap


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """(B, 2, H, W) probabilities, (B, H, W) {0, 1} mask -> mean of -(1 - p_t)^gamma log p_t."""
    p_t = probs.gather(1, target.long()[:, None])[:, 0].clamp(1e-6, 1.0)
    return (-(1.0 - p_t) ** gamma * p_t.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(B, H, W) anomalous probability, (B, H, W) mask -> 1 - mean soft Dice per image."""
    p, t = prob.flatten(1), target.float().flatten(1)
    return 1.0 - ((2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def adapter_loss(head: AprilLabHead, levels: Sequence[torch.Tensor], text: torch.Tensor,
                 masks: torch.Tensor) -> torch.Tensor:
    """Training loss, summed over levels: focal (gamma 2) on both channels + Dice on the
    anomalous channel. levels L x (B, P, C), text (2, D), masks (B, H, W)."""
    total = torch.zeros(())
    for probs in head.level_probabilities(levels, text):
        total = total + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)
    return total


# ------------------------------------------------------------------------------ text recipe
def category_text(model, tokenizer, category: str, ensemble: dict,
                  descriptions: dict | None = None, adaptation: dict | None = None
                  ) -> tuple[dict, dict]:
    """Arrays for ``text.npz`` and the prompt record of one category, AprilLab recipe:
    prototypes (2, D) = per state, the normalized mean of the normalized prompt embeddings.
    Prompt files and adaptation are not part of the recipe."""
    if descriptions or adaptation:
        raise ValueError("the aprillab text recipe takes neither prompt files nor prompt "
                         "adaptation")
    normal, anomalous = expand_prompts(category, ensemble)
    e_normal = encode_texts(model, tokenizer, normal)
    e_anomalous = encode_texts(model, tokenizer, anomalous)
    prototypes = text_prototypes(torch.from_numpy(e_normal), torch.from_numpy(e_anomalous))
    arrays = {"prototypes": prototypes.numpy().astype(np.float32),
              "normal_embeddings": e_normal, "anomalous_embeddings": e_anomalous}
    return arrays, {"category": category, "normal": normal, "anomalous": anomalous}


# ---------------------------------------------------------------------- projection checkpoints
def require_adapters(options: dict) -> None:
    if options.get("adapters") in (None, ""):
        raise ValueError("the aprillab method needs its per-level projections: pass --adapters "
                         "FILE (written by 'clipinspect train-adapters', or APRIL-GAN's "
                         "checkpoint), or --adapters none for random ones (tests only)")


def load_projections(adapters: str | Path, width: int, dim: int, layers: Sequence[int],
                     model_name: str, seed: int = 0) -> tuple[LevelProjections, dict]:
    """-> (projections, manifest record). ``adapters``: a checkpoint file (APRIL-GAN's form or
    train-adapters'), or "none" for a seeded random init (warned, recorded). ValueError saying
    what is wrong with the file otherwise."""
    require_adapters({"adapters": adapters})
    if str(adapters).lower() == "none":
        log(RANDOM_PROJECTIONS_WARNING)
        torch.manual_seed(seed)
        return LevelProjections(width, dim, len(layers)).eval(), {"kind": "random", "seed": seed}
    path = Path(adapters)
    if not path.is_file():
        raise ValueError(f"adapter checkpoint {str(adapters)!r} does not exist; pass the file "
                         "written by 'clipinspect train-adapters' (or APRIL-GAN's), or 'none'")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"could not read adapter checkpoint {str(adapters)!r}: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"adapter checkpoint {str(adapters)!r} holds a "
                         f"{type(checkpoint).__name__}, not a state dict")
    meta = checkpoint.get("clipinspect") or {}
    if meta and (list(meta.get("layers", layers)) != list(layers)
                 or meta.get("model", model_name) != model_name):
        raise ValueError(f"adapter checkpoint {str(adapters)!r} was trained for {meta.get('model')} "
                         f"layers {meta.get('layers')}, not {model_name} layers {list(layers)}; "
                         "export with the same --model and --layers")
    projections = LevelProjections(width, dim, len(layers))
    projections.load_state_dict(projection_state(checkpoint, width, dim, len(layers)))
    record = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    if meta:
        record["trained"] = {k: meta[k] for k in ("epochs", "data", "categories", "loss")
                             if k in meta}
    return projections.eval(), record


def build_modules(model, layers: Sequence[int] | None, image_size: int | None,
                  projections: LevelProjections) -> tuple[AprilLabEncoder, dict[str, AprilLabHead]]:
    """Encoder and both heads for ``model`` (layers None: quarter points of the depth)."""
    depth = len(model.visual.transformer.resblocks)
    layers = check_layers(layers or default_layers(depth), depth)
    size = None if image_size is None else (int(image_size), int(image_size))
    encoder = AprilLabEncoder(model.visual, layers, size).eval()
    heads = {name: AprilLabHead(projections, layers, encoder.grid, encoder.image_size,
                                few_shot=name == "head_fewshot").eval()
             for name in HEADS}
    return encoder, heads


# -------------------------------------------------------------------------- eager reference
class AprilLabReference:
    """Eager AprilLab on open_clip's own ``forward_intermediates`` (a copy of the tower whose
    positional embedding is resampled to the input size), projections as plain matrix products,
    per-level upsampling then softmax, as the formula reads."""

    def __init__(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                 layers: Sequence[int], image_size: int | None = None):
        v = copy.deepcopy(model.visual)
        own, patch = tuple(v.grid_size), int(v.patch_size[0])
        size = int(image_size or own[0] * patch)
        self.grid, self.size = (size // patch, size // patch), (size, size)
        pos = v.positional_embedding.data
        grid = pos[1:].reshape(*own, -1).permute(2, 0, 1)[None]
        grid = F.interpolate(grid, size=self.grid, mode="bicubic", align_corners=False)
        v.positional_embedding = torch.nn.Parameter(
            torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(self.grid[0] * self.grid[1], -1)]))
        v.grid_size = self.grid
        self.visual, self.state, self.layers = v, dict(state), tuple(layers)

    @classmethod
    def from_manifest(cls, model: torch.nn.Module, manifest: Manifest) -> "AprilLabReference":
        record, layers = manifest.aprillab["projections"], manifest.aprillab["layers"]
        width, dim = manifest.dims.width, manifest.dims.embed
        source = record["path"] if record["kind"] == "file" else "none"
        projections, _ = load_projections(source, width, dim, layers, manifest.model.name,
                                          record.get("seed", 0))
        return cls(model, projections.state_dict(), layers, manifest.preprocess.size[0])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) -> image embedding (B, D), L x level tokens (B, P, C)."""
        out = self.visual.forward_intermediates(images, indices=[n - 1 for n in self.layers],
                                                output_fmt="NLC", intermediates_only=True)
        return self.visual(images), out["image_intermediates"]

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, gh, gw) -> (B, K, H, W) bilinear, align_corners true."""
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=True)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor, memory=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), text (2, D) raw prototypes, memory: ``features`` of the reference
        images or None -> image_score (B,), anomaly_map (B, H, W) at the input size."""
        t = F.normalize(text, dim=-1)
        embedding, levels = self.features(images)
        score = (LOGIT_SCALE * F.normalize(embedding, dim=-1) @ t.T).softmax(-1)[:, 1]
        amap = 0
        for i, x in enumerate(levels):
            z = x @ self.state[f"fc.{i}.weight"].T + self.state[f"fc.{i}.bias"]
            logits = (LOGIT_SCALE * F.normalize(z, dim=-1) @ t.T).permute(0, 2, 1)
            amap = amap + self.upsample(logits.reshape(-1, 2, *self.grid)).softmax(dim=1)[:, 1]
        for x, m in zip(levels, memory[1] if memory is not None else ()):
            cos = F.normalize(x, dim=-1) @ F.normalize(m.flatten(0, 1), dim=-1).T
            amap = amap + self.upsample((1 - cos).min(dim=-1).values.reshape(-1, 1, *self.grid))[:, 0]
        return score, amap


# ----------------------------------------------------------------------------------- the unit
def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    visual = clip.model.visual
    depth = len(visual.transformer.resblocks)
    layers = check_layers(options["layers"] or default_layers(depth), depth)
    width, dim = int(visual.conv1.out_channels), int(visual.output_dim)
    projections, record = load_projections(options["adapters"], width, dim, layers, clip.name,
                                           clip.seed)
    encoder, heads = build_modules(clip.model, layers, options["image_size"], projections)
    own = visual.image_size
    own = [own, own] if isinstance(own, int) else [int(s) for s in own]
    log(f"      {encoder.image_size[0]}x{encoder.image_size[1]}, levels {list(layers)}")
    return Built(encoder, heads, {"scales": [], "aprillab": {
        "layers": list(layers),
        "positional_embedding": ("as trained" if own == list(encoder.image_size) else
                                 f"resampled bicubically from {own[0]}x{own[1]}"),
        "projections": record,
        "logit_scale": LOGIT_SCALE,
        "map": "at the input size (per level: upsampled bilinearly, align_corners true, "
               "then softmax; summed over levels)",
    }})


METHOD = ExportMethod(
    name="aprillab",
    summary="multi-layer learned projections after APRIL-GAN, needs --adapters",
    options=(
        Option("adapters", None, "aprillab: per-level projection checkpoint (train-adapters' or "
               "APRIL-GAN's), or 'none' for random projections", metavar="FILE"),
        Option("layers", None, "aprillab: 1-based blocks whose tokens are the feature levels "
               "(default: quarter points of the depth, 6,12,18,24 for 24 blocks)",
               type=int_list(1, "6,12,18,24")),
        Option("image_size", None, "aprillab: square input side, a multiple of the patch size, if "
               "not the model's own (positional embedding resampled bicubically; APRIL-GAN: 518)",
               type=int, metavar="PIXELS")),
    build=build, category_text=category_text, reference=AprilLabReference,
    ensemble="aprillab", prompt_adaptation=False, check=require_adapters)

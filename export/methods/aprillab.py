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
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from clipinspect.runtime.cli import int_list, positive_int
from clipinspect.runtime.core.bundle import sha256_file
from clipinspect.runtime.core.manifest import Manifest, parse
from clipinspect.runtime.methods.aprillab import (MAP_RANGE, MIN_MAP_SPAN, AprilLabSection,
                                                 Projections)

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


# Input sides APRIL-GAN runs a model at when it is not the model's own (its released
# projections were fitted at these); other models default to their own size.
DEFAULT_IMAGE_SIZE = {"ViT-L-14-336": 518}


def image_size_for(model_name: str, image_size: int | None) -> int | None:
    """The input side to run ``model_name`` at: the one asked for, else APRIL-GAN's for this
    model, else None (the model's own)."""
    return image_size or DEFAULT_IMAGE_SIZE.get(model_name)


# MLP activations of an open_clip transformer block, by the names the manifest records.
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def activation_name(text: str) -> str:
    """Command-line value -> a key of ACTIVATIONS (quick-gelu accepted for quick_gelu)."""
    name = text.strip().lower().replace("-", "_")
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {text!r}: choose gelu or quick_gelu")
    return name


def _mlps(model: nn.Module) -> list[nn.Module]:
    """Every transformer block's MLP (both towers), each holding its activation as ``gelu``."""
    return [m.mlp for m in model.modules() if hasattr(getattr(m, "mlp", None), "gelu")]


def model_activation(model: nn.Module) -> str:
    """The activation open_clip built ``model`` with: from the model config and, depending on
    the open_clip version, the weights' tag ('openai' meant QuickGELU in some versions)."""
    found = {name for m in _mlps(model) for name, kind in ACTIVATIONS.items()
             if type(m.gelu) is kind}
    if len(found) != 1:
        raise ValueError(f"cannot tell the model's MLP activation (found {sorted(found)})")
    return found.pop()


def set_activation(model: nn.Module, name: str) -> None:
    """Use activation ``name`` in every block of both towers (in place)."""
    for mlp in _mlps(model):
        mlp.gelu = ACTIVATIONS[name]()


def check_activation(meta: Mapping, activation: str, source: str) -> None:
    """Refuse projections fitted to the other activation: the level tokens differ."""
    trained = meta.get("activation")
    if trained is not None and trained != activation:
        raise ValueError(f"adapter checkpoint {source!r} was trained with activation {trained}, "
                         f"but this model runs {activation}: export with --activation {trained} "
                         f"(or train projections with --activation {activation})")


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
    """(1 + P_old, C) -> (1 + P_new, C): the patch part resampled as a grid (the class position
    kept), so the model runs at another input size (APRIL-GAN: 336 -> 518). Antialiased bicubic,
    as open_clip resizes it when a model is created at another image size (APRIL-GAN's path);
    its kernel differs from plain bicubic even when upsampling."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    patches = pos[1:].reshape(1, *old_grid, -1).permute(0, 3, 1, 2)          # (1, C, gh, gw)
    patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", align_corners=False,
                            antialias=True)
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
    [few-shot: memory_level_tokens_<n> (M, C) per level, reference_map_range (2,)].

    Outputs: image_score (B,), anomaly_grid (B, H, W): the map already at the input size (the
    per-level upsampling happens before the softmax, as the method defines).

    Few-shot image score, APRIL-GAN's combination ``0.5 * (s + (max A - lo) / (hi - lo))`` with
    s the zero-shot text probability and A the few-shot map. APRIL-GAN takes lo, hi from the
    test set's own map maxima; we take them from the reference images, fixed when they are
    stored (``reference_map_range`` = [lo, hi], docs/methods.md#aprillab-after-april-gan).
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
        return names + ([f"memory_{n}" for n in levels] + [MAP_RANGE] if self.few_shot else [])

    def example_inputs(self) -> dict[str, torch.Tensor]:
        """Example values of the inputs that are neither encoder outputs, text nor memory (for
        tracing and the parity check); fixed-shape inputs."""
        return {MAP_RANGE: torch.tensor([0.5, 2.0])} if self.few_shot else {}

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
            image_score = combined_score(image_score, amap.flatten(1).max(dim=-1).values,
                                         named[MAP_RANGE])
        return image_score, amap


def combined_score(text_probability: torch.Tensor, map_max: torch.Tensor,
                   map_range: torch.Tensor) -> torch.Tensor:
    """(B,), (B,), [lo, hi] (2,) -> (B,) few-shot image score: 0.5 * (text probability +
    map maximum scaled so that lo -> 0 and hi -> 1). The runtime refuses hi - lo below
    MIN_MAP_SPAN when it computes the range; the clamp only keeps a hand-made range finite."""
    span = (map_range[1] - map_range[0]).clamp_min(MIN_MAP_SPAN)
    return 0.5 * (text_probability + (map_max - map_range[0]) / span)


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
                     model_name: str, seed: int = 0, *, activation: str | None = None
                     ) -> tuple[LevelProjections, dict]:
    """-> (projections, manifest record). ``adapters``: a checkpoint file (APRIL-GAN's form or
    train-adapters'), or "none" for a seeded random init (warned, recorded). ValueError saying
    what is wrong with the file otherwise, or when it was trained with another ``activation``
    than the model's."""
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
    if activation is not None:
        check_activation(meta, activation, str(adapters))
    projections = LevelProjections(width, dim, len(layers))
    projections.load_state_dict(projection_state(checkpoint, width, dim, len(layers)))
    record = {"kind": "file", "path": str(path.resolve()), "sha256": sha256_file(path)}
    if meta:
        record["trained"] = {k: meta[k] for k in ("epochs", "data", "categories", "loss",
                                                  "activation") if k in meta}
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
def resized_tower(model: torch.nn.Module, image_size: int | None = None,
                  activation: str | None = None) -> tuple[nn.Module, tuple, tuple]:
    """A copy of the vision tower as open_clip builds it at another size (its positional
    embedding resampled by ``resize_pos_embed``), with ``activation`` if given -> (tower, grid,
    (H, W)). The eager references of the multi-layer methods run on it."""
    from open_clip.model import resize_pos_embed

    v = copy.deepcopy(model.visual)
    if activation is not None:
        set_activation(v, activation)
    own, patch = tuple(v.grid_size), int(v.patch_size[0])
    size = int(image_size or own[0] * patch)
    grid = (size // patch, size // patch)
    v.grid_size = grid
    pos = {"visual.positional_embedding": v.positional_embedding.data}
    resize_pos_embed(pos, SimpleNamespace(visual=v))
    v.positional_embedding = torch.nn.Parameter(pos["visual.positional_embedding"])
    return v, grid, (size, size)


class AprilLabReference:
    """Eager AprilLab on open_clip's own ``forward_intermediates`` (a copy of the tower whose
    positional embedding open_clip's ``resize_pos_embed`` resamples to the input size, as when
    APRIL-GAN creates the model at 518), projections as plain matrix products, per-level
    upsampling then softmax, as the formula reads."""

    def __init__(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                 layers: Sequence[int], image_size: int | None = None,
                 activation: str | None = None):
        self.visual, self.grid, self.size = resized_tower(model, image_size, activation)
        self.state, self.layers = dict(state), tuple(layers)

    @classmethod
    def from_manifest(cls, model: torch.nn.Module, manifest: Manifest) -> "AprilLabReference":
        record, layers = manifest.section.projections, manifest.section.layers
        width, dim = manifest.dims.width, manifest.dims.embed
        source = record.path if record.kind == "file" else "none"
        activation = manifest.section.activation
        projections, _ = load_projections(source, width, dim, layers, manifest.model.name,
                                          record.seed or 0, activation=activation)
        return cls(model, projections.state_dict(), layers, manifest.preprocess.size[0],
                   activation)

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
    def map_range(self, references: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(K, 3, H, W) reference images, text (2, D) -> [lo, hi]: min and max over the
        references of the few-shot map's maximum, each against the features of the others."""
        peaks = []
        for k in range(len(references)):
            others = torch.cat([references[:k], references[k + 1:]])
            _, amap = self(references[k:k + 1], text, self.features(others), torch.tensor([0., 1.]))
            peaks.append(amap.max())
        return torch.stack([min(peaks), max(peaks)])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, text: torch.Tensor, memory=None,
                 map_range: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), text (2, D) raw prototypes, memory: ``features`` of the reference
        images or None, map_range: [lo, hi] with memory (``map_range``) -> image_score (B,),
        anomaly_map (B, H, W) at the input size. Few-shot score: 0.5 * (text probability +
        (map max - lo) / (hi - lo))."""
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
        if memory is not None:
            lo, hi = float(map_range[0]), float(map_range[1])
            score = 0.5 * (score + (amap.amax(dim=(1, 2)) - lo) / (hi - lo))
        return score, amap


# ----------------------------------------------------------------------------------- the unit
def build(clip: Clip, options: dict, adaptation: Adaptation | None) -> Built:
    visual = clip.model.visual
    depth = len(visual.transformer.resblocks)
    layers = check_layers(options["layers"] or default_layers(depth), depth)
    width, dim = int(visual.conv1.out_channels), int(visual.output_dim)
    activation = options["activation"] or model_activation(clip.model)
    set_activation(clip.model, activation)
    projections, record = load_projections(options["adapters"], width, dim, layers, clip.name,
                                           clip.seed, activation=activation)
    image_size = image_size_for(clip.name, options["image_size"])
    encoder, heads = build_modules(clip.model, layers, image_size, projections)
    own = visual.image_size
    own = [own, own] if isinstance(own, int) else [int(s) for s in own]
    log(f"      {encoder.image_size[0]}x{encoder.image_size[1]}, levels {list(layers)}")
    section = AprilLabSection(list(layers), parse(Projections, record, "export", "projections"),
                              activation, extra={
        "positional_embedding": ("as trained" if own == list(encoder.image_size) else
                                 f"resampled bicubically (antialiased) from {own[0]}x{own[1]}"),
        "activation_source": "--activation" if options["activation"] else "model config",
        "logit_scale": LOGIT_SCALE,
        "map": "at the input size (per level: upsampled bilinearly, align_corners true, "
               "then softmax; summed over levels)"})
    return Built(encoder, heads, section)


def text_tower(model: nn.Module, manifest: Manifest) -> None:
    """The text tower as the bundle's export ran it: with the recorded MLP activation."""
    if manifest.section.activation:
        set_activation(model, manifest.section.activation)


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
               "not the model's own (positional embedding resampled bicubically; default 518 for "
               "ViT-L-14-336 as APRIL-GAN, else the model's own)",
               type=positive_int, metavar="PIXELS"),
        Option("activation", None, "aprillab: MLP activation of both towers, gelu or quick_gelu "
               "(default: what open_clip's model config gives, recorded; APRIL-GAN's "
               "projections were fitted with gelu)", type=activation_name, metavar="NAME")),
    build=build, category_text=category_text, reference=AprilLabReference,
    ensemble="aprillab", prompt_adaptation=False, check=require_adapters, text_tower=text_tower)

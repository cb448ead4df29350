"""Prompt ensembles and their text embeddings (computed once, at export, with the text tower);
each method's text recipe (methods/) is built from these."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch


def load_ensemble(name: str = "winclip") -> dict:
    text = resources.files("clipinspect.export.prompts").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def expand_prompts(category: str, ensemble: dict) -> tuple[list[str], list[str]]:
    """-> (normal prompts, anomalous prompts) for one category, name inserted as given."""
    def expand(states):
        return [t.format(s.format(category)) for s in states for t in ensemble["templates"]]
    return expand(ensemble["normal_states"]), expand(ensemble["anomalous_states"])


@torch.no_grad()
def encode_texts(model, tokenizer, prompts: list[str], batch_size: int = 64) -> np.ndarray:
    """(N, D) float32 raw (not normalized) text embeddings.

    A causal text tower pooled at the end-of-text token (open_clip's CLIP) runs only up to the
    batch's last end-of-text token instead of the whole 77-token context: a token attends only
    to those before it, so the padding after it changes nothing but the time (prompts are about
    a fifth of the context; tests/test_text_tower.py checks the equality). Other towers
    run as open_clip runs them."""
    short = _causal_argmax_tower(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i:i + batch_size])
        x = _encode_to_last_eot(model, tokens) if short else model.encode_text(tokens)
        out.append(x.float())
    return torch.cat(out).numpy()


def _causal_argmax_tower(model) -> bool:
    """open_clip's built-in text tower, causally masked and pooled at the highest token id
    (the end-of-text token), as every CLIP of OpenAI's layout is."""
    mask = getattr(model, "attn_mask", None)
    if getattr(model, "text_pool_type", None) != "argmax" or not isinstance(mask, torch.Tensor):
        return False
    if not all(hasattr(model, a) for a in ("token_embedding", "positional_embedding",
                                           "transformer", "ln_final")):
        return False
    above = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    return mask.ndim == 2 and bool(torch.isneginf(mask[above]).all()) and \
        bool((mask[~above] == 0).all())


def _encode_to_last_eot(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` on the first L positions, L = the last end-of-text + 1."""
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), eot]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def ambiguity_filter(normal: np.ndarray, anomalous: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Offline ambiguity filter (docs/methods.md#ambiguity-filter, our formulation).

    normal (N_n, D), anomalous (N_a, D) raw embeddings -> boolean keep masks (N_n,), (N_a,): a
    prompt is dropped when its normalized embedding has a higher cosine with the other state's
    mean than with its own state's mean (means of the normalized embeddings, itself included).
    """
    n, a = normalized(normal), normalized(anomalous)
    mean_n, mean_a = normalized(n.mean(0)), normalized(a.mean(0))
    return n @ mean_n >= n @ mean_a, a @ mean_a >= a @ mean_n


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

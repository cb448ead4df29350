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
    """(N, D) float32 raw (not normalized) text embeddings."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(model.encode_text(tokenizer(prompts[i:i + batch_size])).float())
    return torch.cat(out).numpy()


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

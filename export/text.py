"""Prompt ensembles and their text embeddings (computed once, at export, with the text tower)."""

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


def category_text(model, tokenizer, category: str, ensemble: dict) -> tuple[dict, dict]:
    """Arrays for ``text.npz`` and the prompt record for ``prompts.json`` of one category.

    prototypes (2, D): means of the raw embeddings per state, rows [normal, anomalous].
    """
    normal, anomalous = expand_prompts(category, ensemble)
    e_normal = encode_texts(model, tokenizer, normal)
    e_anomalous = encode_texts(model, tokenizer, anomalous)
    prototypes = np.stack([e_normal.mean(0), e_anomalous.mean(0)]).astype(np.float32)
    arrays = {"prototypes": prototypes, "normal_embeddings": e_normal,
              "anomalous_embeddings": e_anomalous}
    record = {"category": category, "normal": normal, "anomalous": anomalous}
    return arrays, record

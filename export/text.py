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


def ambiguity_filter(normal: np.ndarray, anomalous: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Offline ambiguity filter (METHODS.md section 5, our formulation).

    normal (N_n, D), anomalous (N_a, D) raw embeddings -> boolean keep masks (N_n,), (N_a,): a
    prompt is dropped when its normalized embedding has a higher cosine with the other state's
    mean than with its own state's mean (means of the normalized embeddings, itself included).
    """
    n, a = _normalized(normal), _normalized(anomalous)
    mean_n, mean_a = _normalized(n.mean(0)), _normalized(a.mean(0))
    return n @ mean_n >= n @ mean_a, a @ mean_a >= a @ mean_n


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def category_text(model, tokenizer, category: str, ensemble: dict,
                  descriptions: dict[str, list[str]] | None = None,
                  adaptation: dict | None = None) -> tuple[dict, dict]:
    """Arrays for ``text.npz`` and the prompt record for ``prompts.json`` of one category.

    descriptions: the category's entry of a prompt file ({"normal": [...], "anomalous": [...]}),
    appended to the ensemble's prompts of each state. adaptation: the bundle's adaptation record
    (or None); with it the ambiguity filter runs and the kept prompts' normalized embeddings are
    stored as the pools ``text_normal`` (N_n, D) and ``text_anomalous`` (N_a, D).

    prototypes (2, D): means of the raw embeddings per state (all prompts), rows [normal,
    anomalous].
    """
    from .prompt_files import expand

    normal, anomalous = expand_prompts(category, ensemble)
    extra = {s: expand((descriptions or {}).get(s, []), category) for s in ("normal", "anomalous")}
    normal, anomalous = normal + extra["normal"], anomalous + extra["anomalous"]
    e_normal = encode_texts(model, tokenizer, normal)
    e_anomalous = encode_texts(model, tokenizer, anomalous)
    prototypes = np.stack([e_normal.mean(0), e_anomalous.mean(0)]).astype(np.float32)
    arrays = {"prototypes": prototypes, "normal_embeddings": e_normal,
              "anomalous_embeddings": e_anomalous}
    record = {"category": category, "normal": normal, "anomalous": anomalous,
              "from_prompt_file": extra}
    if adaptation is not None:
        keep_n, keep_a = ambiguity_filter(e_normal, e_anomalous)
        for state, keep in (("normal", keep_n), ("anomalous", keep_a)):
            top_k = adaptation.get("top_k")
            if keep.sum() == 0 or (top_k and keep.sum() < top_k):
                raise ValueError(f"category {category!r}: the ambiguity filter kept "
                                 f"{int(keep.sum())} of {len(keep)} {state} prompts, fewer than "
                                 f"{'top-k ' + str(top_k) if top_k else 'one'}; add clearer "
                                 f"{state} descriptions to the prompt file or lower --top-k")
        arrays["text_normal"] = _normalized(e_normal[keep_n]).astype(np.float32)
        arrays["text_anomalous"] = _normalized(e_anomalous[keep_a]).astype(np.float32)
        record["dropped_by_ambiguity_filter"] = {
            "normal": [p for p, k in zip(normal, keep_n) if not k],
            "anomalous": [p for p, k in zip(anomalous, keep_a) if not k]}
    return arrays, record

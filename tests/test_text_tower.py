"""Text embeddings computed up to the last end-of-text token equal open_clip's encode_text over
the whole context; towers of another layout are run by open_clip itself."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra

from clipinspect.export import text  # noqa: E402


def test_short_context_equals_open_clips_encode_text(small_model):
    model, tokenizer = small_model
    assert text._causal_argmax_tower(model)
    normal, anomalous = text.expand_prompts("metal nut", text.load_ensemble())
    prompts = [*normal[:40], *anomalous[:30], "a photo of a " + "very " * 40 + "long nut."]
    got = text.encode_texts(model, tokenizer, prompts, batch_size=32)
    with torch.no_grad():
        want = torch.cat([model.encode_text(tokenizer(prompts[i:i + 32]))
                          for i in range(0, len(prompts), 32)]).numpy()
    assert got.shape == want.shape == (71, 384)
    assert np.abs(got - want).max() <= 1e-5


class _OtherTower(torch.nn.Module):
    """Pooled at the first token, no causal mask: the short path would be wrong for it."""
    text_pool_type = "first"
    attn_mask = None

    def __init__(self):
        super().__init__()
        self.calls = 0

    def encode_text(self, tokens):
        self.calls += 1
        return tokens[:, :3].float()


def test_other_towers_run_whole_through_encode_text(small_model):
    tower = _OtherTower()
    assert not text._causal_argmax_tower(tower)
    out = text.encode_texts(tower, small_model[1], ["a", "b", "c"], batch_size=2)
    assert tower.calls == 2 and out.shape == (3, 3)


def test_a_mask_that_is_not_causal_is_not_taken_for_one(small_model):
    model = small_model[0]
    saved = model.attn_mask
    try:
        model.attn_mask = torch.zeros_like(saved)  # full attention: padding would matter
        assert not text._causal_argmax_tower(model)
    finally:
        model.attn_mask = saved
    assert text._causal_argmax_tower(model)

"""One encoder pass for a batch of several categories and modes (``Inspector.inspect_mixed``,
what ``clipinspect serve`` runs per micro-batch): results bitwise equal to inspecting each
(category, mode) group on its own, the encoder run once, bad inputs and keys handled."""

from __future__ import annotations

import numpy as np
import pytest

from clipinspect.runtime import Inspector
from clipinspect.runtime.core.errors import ClipInspectError, UsageError
from clipinspect.runtime.core.images import EncodedImage


def images(n: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (size + 4 * i, size, 3), dtype=np.uint8) for i in range(n)]


class Counting:
    """A backend wrapper counting encoder passes; ``opaque`` hides the encoder outputs in a
    non-numpy holder, as a device backend's (CUDA, TensorRT) are."""

    def __init__(self, backend, opaque: bool = False):
        self.inner, self.opaque, self.encodes = backend, opaque, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, batch):
        self.encodes += 1
        out = self.inner.encode(batch)
        return {k: Held(v) for k, v in out.items()} if self.opaque else out

    def score(self, encoded, head, extra):
        return self.inner.score({k: getattr(v, "array", v) for k, v in encoded.items()}, head,
                                extra)

    def select_rows(self, encoded, rows):
        # As a device backend: no row indexing where the outputs are, the caller keeps rows.
        return (encoded, rows) if self.opaque else self.inner.select_rows(encoded, rows)


class Held:
    def __init__(self, array):
        self.array = array


def per_group(inspector: Inspector, batch, keys):
    """The reference: each (category, mode) group inspected as its own batch."""
    out = [None] * len(batch)
    for key in dict.fromkeys(keys):
        members = [i for i, k in enumerate(keys) if k == key]
        for i, r in zip(members, inspector.inspect_loaded([batch[i] for i in members], *key)):
            out[i] = r
    return out


def assert_same(mixed, reference) -> None:
    for m, r in zip(mixed, reference):
        assert (m.source, m.mode, m.error) == (r.source, r.mode, r.error)
        assert m.image_score == r.image_score  # bitwise, not approximately
        if r.ok:
            np.testing.assert_array_equal(m.anomaly_map, r.anomaly_map)


@pytest.fixture
def fewshot_inspector(tiny_bundle_copy):
    inspector = Inspector.open(tiny_bundle_copy, threads=1)
    inspector.add_references("weave", images(2, 48))
    return inspector


KEYS = [("weave", "auto"), ("washer", "auto"), ("weave", "zero-shot"), ("washer", "auto"),
        ("weave", "few-shot"), ("weave", "auto"), ("washer", "zero-shot")]


@pytest.mark.parametrize("opaque", [False, True], ids=["host outputs", "device-like outputs"])
def test_mixed_categories_and_modes_equal_per_group_with_one_encoder_pass(fewshot_inspector,
                                                                          opaque):
    inspector = fewshot_inspector
    batch = [inspector.load(x) for x in images(len(KEYS))]
    batch[3] = inspector.load(EncodedImage(b"not an image"))
    reference = per_group(inspector, batch, KEYS)
    inspector.backend = counting = Counting(inspector.backend, opaque)
    mixed = inspector.inspect_mixed(batch, KEYS)
    assert counting.encodes == 1
    assert [r.mode for r in mixed] == ["few-shot", "zero-shot", "zero-shot", None, "few-shot",
                                       "few-shot", "zero-shot"]
    assert mixed[3].error and not mixed[3].ok
    assert_same(mixed, reference)
    # not one score for all by accident: categories and modes give different numbers
    assert len({r.image_score for r in mixed if r.ok}) == 6


def test_a_batch_of_only_unusable_inputs_runs_no_encoder(fewshot_inspector):
    inspector = fewshot_inspector
    inspector.backend = counting = Counting(inspector.backend)
    bad = [inspector.load(EncodedImage(b"x")), inspector.load(EncodedImage(b"y"))]
    results = inspector.inspect_mixed(bad, [("weave", "auto"), ("washer", "auto")])
    assert counting.encodes == 0 and all(r.error for r in results)


def test_bad_keys_are_refused_before_any_work(fewshot_inspector):
    inspector = fewshot_inspector
    inspector.backend = counting = Counting(inspector.backend)
    batch = [inspector.load(x) for x in images(2)]
    with pytest.raises(ClipInspectError, match="nonexistent"):
        inspector.inspect_mixed(batch, [("weave", "auto"), ("nonexistent", "auto")])
    with pytest.raises(ClipInspectError, match="no reference images"):
        inspector.inspect_mixed(batch, [("weave", "auto"), ("washer", "few-shot")])
    with pytest.raises(UsageError, match="one key per input"):
        inspector.inspect_mixed(batch, [("weave", "auto")])
    assert counting.encodes == 0


def test_real_model_mixed_categories_equal_per_category(small_bundle_path):
    inspector = Inspector.open(small_bundle_path, threads=2)
    keys = [("weave", "auto"), ("washer", "auto")] * 3
    batch = [inspector.load(x) for x in images(len(keys), 64)]
    assert_same(inspector.inspect_mixed(batch, keys), per_group(inspector, batch, keys))

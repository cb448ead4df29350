"""What the Inspector needs from an execution backend: a small protocol, one file per backend.

Backends: ``OrtBackend`` (onnxruntime_backend.py: providers cpu, cuda, tensorrt) and
``TrtBackend`` (runtime/tensorrt/backend.py: provider tensorrt-native). :func:`open_backend` in
backends.py picks and sets one up; tests/test_backend_conformance.py checks that every backend it
knows defines every member below and behaves the same on what this machine can run.

Encoder outputs are opaque to the caller between ``encode`` and ``score`` (numpy arrays on the
CPU, device arrays elsewhere), so they can stay on the GPU; ``to_host`` brings them back.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """Encoder + scoring heads of one bundle precision on one provider."""

    #: The provider the user asked for: "cpu", "cuda", "tensorrt" or "tensorrt-native".
    provider: str
    #: Names of the encoder's outputs, in graph order (e.g. "image_embedding", "patch_tokens").
    encoder_outputs: list[str]
    #: {head graph name: ([input names], [output names])} for "head_zeroshot", "head_fewshot";
    #: a few-shot input "memory_X" is reference memory made of encoder output X.
    head_io: dict[str, tuple[list[str], list[str]]]

    def encode(self, images: np.ndarray) -> dict[str, Any]:
        """images (B, 3, H, W) float32 -> {encoder output: array with leading axis B}, kept
        where the backend computes (host or device)."""
        ...

    def score(self, encoded: dict[str, Any], head: str, extra: dict[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
        """Run ``head`` on ``encoded`` plus the category arrays ``extra`` (text prototypes
        (P, D), few-shot memory (shots * rows, D)) -> on the host: {"image_score": (B,),
        "anomaly_grid": (B, gh, gw)} (aprillab: the grid is the input size)."""
        ...

    def to_host(self, encoded: dict[str, Any]) -> dict[str, np.ndarray]:
        """Encoder outputs of :meth:`encode` as numpy arrays (only the encoder outputs)."""
        ...


def protocol_members() -> list[str]:
    """Every member a backend must define: the Protocol's annotated attributes and methods."""
    methods = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    return sorted({*Backend.__annotations__, *methods})

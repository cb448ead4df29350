"""What the Inspector needs from an execution backend: a small protocol, one file per backend.

Backends: ``OrtBackend`` (onnxruntime_backend.py: providers cpu, cuda, tensorrt) and
``TrtBackend`` (runtime/tensorrt/backend.py: provider tensorrt-native). :func:`open_backend` in
backends.py maps the provider to its class and calls its ``open``; tests/test_backend_conformance.py
checks that every backend it knows defines every member below and behaves the same on what this
machine can run.

Encoder outputs are opaque to the caller between ``encode`` and ``score`` (numpy arrays on the
CPU, device arrays elsewhere), so they can stay on the GPU; ``to_host`` brings them back and
``select_rows`` picks the rows of a few images of the batch without knowing where they are.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .bundle import Bundle


@runtime_checkable
class Backend(Protocol):
    """Encoder + scoring heads of one bundle precision on one provider."""

    #: The provider the user asked for: one of names.PROVIDERS.
    provider: str
    #: Names of the encoder's outputs, in graph order (e.g. "image_embedding", "patch_tokens").
    encoder_outputs: list[str]
    #: {head graph name: ([input names], [output names])} for names.HEADS; a few-shot input
    #: "memory_X" is reference memory made of encoder output X.
    head_io: dict[str, tuple[list[str], list[str]]]
    #: The largest batch :meth:`encode` takes (None: no fixed limit).
    max_batch: int | None

    @classmethod
    def open(cls, bundle: "Bundle", precision: str, provider: str, *, threads: int | None = None,
             batch_size: int | None = None, verify_checksums: bool = True) -> "Backend":
        """The backend running ``bundle``'s ``precision`` graphs on ``provider``, set up for
        batches of up to ``batch_size`` images (None: the backend's default); a batch size the
        backend cannot take is an error (UsageError) that says what to do."""
        ...

    def encode(self, images: np.ndarray) -> dict[str, Any]:
        """images (B, 3, H, W) float32 -> {encoder output: array with leading axis B}, kept
        where the backend computes (host or device); exactly ``encoder_outputs``."""
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

    def select_rows(self, encoded: dict[str, Any], rows: list[int]
                    ) -> tuple[dict[str, Any], list[int] | None]:
        """Encoder outputs for a head to score only the images ``rows`` of the batch -> (the
        outputs to score, the rows of the head's outputs to keep): (those rows, None) where the
        backend indexes them where they are, (all of ``encoded``, ``rows``) where that would
        cost a host round trip (the head then scores the whole batch)."""
        ...


def protocol_members() -> list[str]:
    """Every member a backend must define: the Protocol's annotated attributes and methods."""
    methods = [n for n, v in vars(Backend).items() if not n.startswith("_")
               and (inspect.isfunction(v) or isinstance(v, classmethod))]
    return sorted({*Backend.__annotations__, *methods})

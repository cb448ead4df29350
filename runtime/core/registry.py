"""The registries the ground floor owns: scoring methods and backends register themselves here,
so that core (manifest, bundle, Inspector, backend factory) never imports the floors above it
(``runtime/methods``, ``runtime/tensorrt``, ...).

A method is registered by its runtime module (``runtime/methods/<name>.py``, imported by the
runtime package); core asks it, through :class:`MethodSpec`, for what differs per method: its
manifest section, its encoder outputs and their shapes, the few-shot memory it needs, and how
many reference images it takes. A backend registers a loader of its class per provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from .errors import ClipInspectError, did_you_mean

if TYPE_CHECKING:
    import numpy as np

# The manifest (core.manifest) imports this module; its type is named, not imported, here.
Manifest = Any


class MethodError(ClipInspectError, ValueError):
    """A bundle's method is unknown or its manifest does not match it."""


class MethodSection(Protocol):
    """A method's own part of the manifest, typed. ``KEYS``: the top-level manifest keys it
    reads and writes; ``from_dict(d, at)`` reads them from the whole manifest dict ``d`` (``at``:
    manifest._At, for errors); ``to_dict()`` gives them back; ``check(manifest, at)`` checks
    what must agree with the rest of the manifest; ``summary()`` is one phrase for ``info``;
    ``adapters_categories()``: the categories its learned parts were trained on, as their
    checkpoint records (None: not recorded, or none); ``adapters_kind()``: "file" or "random"
    for a method with learned parts, None for the others."""

    KEYS: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict, at: Any) -> "MethodSection": ...

    def to_dict(self) -> dict[str, Any]: ...

    def check(self, manifest: Manifest, at: Any) -> None: ...

    def summary(self) -> str: ...

    def adapters_categories(self) -> list[str] | None: ...

    def adapters_kind(self) -> str | None: ...


class MemoryContext(Protocol):
    """What a method's memory hook may use of the Inspector: the bundle's manifest, run a
    scoring head on explicit inputs and read a category's text arrays (as the heads take them)."""

    manifest: Manifest

    def run_head(self, head: str, feeds: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]: ...

    def category_text(self, category: str) -> dict[str, "np.ndarray"]: ...


class MethodSpec(Protocol):
    """A scoring method as core sees it (``runtime/methods/base.Method`` is one).

    section: its manifest section class; graphs: what every precision must list;
    outputs(manifest) -> encoder outputs in order; output_shapes(manifest) -> {output: (rows,
    width)} per image; memory_extras(manifest) -> {array: shape} the few-shot memory holds
    besides ``memory_<output>``; prepare_memory(context, category, memory) -> the memory the
    few-shot head takes (identity for most); shots_refused(shots) -> why it cannot score with
    that many references (None if it can)."""

    name: str
    summary: str
    section: type
    graphs: tuple[str, ...]

    def outputs(self, manifest: Manifest) -> list[str]: ...

    def output_shapes(self, manifest: Manifest) -> dict[str, tuple[int, int]]: ...

    def memory_extras(self, manifest: Manifest) -> dict[str, tuple[int, ...]]: ...

    def prepare_memory(self, context: MemoryContext, category: str,
                       memory: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]: ...

    def shots_refused(self, shots: int) -> str | None: ...


METHODS: dict[str, MethodSpec] = {}
#: provider -> a function importing and returning the backend class (no import before use).
BACKENDS: dict[str, Callable[[], type]] = {}


def register_method(method: MethodSpec) -> MethodSpec:
    """Make ``method`` known to bundles (its name is the manifest's ``method``)."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise MethodError(f"two methods are registered as {method.name!r}")
    METHODS[method.name] = method
    return method


def register_backend(provider: str, load: Callable[[], type]) -> None:
    """``load()`` returns the class serving ``provider`` (imported only when asked for)."""
    BACKENDS[provider] = load


def method_named(name: str, where: str = "bundle") -> MethodSpec:
    if name not in METHODS:
        raise MethodError(f"{where} uses method {name!r}, which this clipinspect does not know "
                          f"(it knows {', '.join(METHODS)}); upgrade clipinspect")
    return METHODS[name]


def method_of(manifest: Manifest, where: str = "bundle") -> MethodSpec:
    """The bundle's method, checked against its manifest's encoder outputs."""
    method = method_named(manifest.method, where)
    declared = manifest.outputs
    if declared is not None and declared != method.outputs(manifest):
        raise MethodError(f"{where}: its manifest lists encoder outputs {declared}, but method "
                          f"{manifest.method!r} has {method.outputs(manifest)}; export the "
                          "bundle again")
    return method


def backend_loader(provider: str, error: Callable[[str], Exception]) -> Callable[[], type]:
    if provider not in BACKENDS:
        raise error(f"unknown provider {provider!r}{did_you_mean(provider, BACKENDS)}: choose "
                    f"one of {', '.join(BACKENDS)}")
    return BACKENDS[provider]

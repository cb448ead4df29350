"""Loading an open_clip CLIP for export, and what the manifest records about it."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
from pathlib import Path

import torch

from clipinspect.runtime.core.bundle import sha256_file

from .errors import ExportError, log
from .text import encode_texts

PROBE_PROMPT = "a photo of an object."
RANDOM_WEIGHTS_WARNING = (
    "WARNING: exporting with RANDOM weights (--pretrained none). Scores and maps are meaningless "
    "for inspection; use this only for tests and benchmarks. The bundle records it.")


# Exception classes (by name, anywhere in a class's MRO, so that neither httpx nor requests need be
# imported) that mean the download never reached the server: no network, DNS, proxy, timeout, or
# huggingface_hub's offline mode. LocalEntryNotFoundError is what huggingface_hub raises when it
# could not reach the Hub (or was told not to) and the file is not in its local cache.
NETWORK_ERRORS = frozenset({
    "ConnectionError", "ConnectError", "ConnectTimeout", "ConnectTimeoutError", "NetworkError",
    "TimeoutException", "TimeoutError", "Timeout", "ReadTimeout", "ProxyError", "URLError",
    "gaierror", "NewConnectionError", "MaxRetryError", "OfflineModeIsEnabled",
    "LocalEntryNotFoundError"})


class WeightsDownloadError(ExportError):
    """Pretrained weights named by an open_clip tag could not be loaded. ``offline``: the cause is
    no network connection (or offline mode); ``cause``: the cause in words; ``source``: the hub
    repository and file (or URL) open_clip tried to fetch."""

    def __init__(self, message: str, *, cause: str, source: str, offline: bool):
        super().__init__(message)
        self.cause, self.source, self.offline = cause, source, offline

    @classmethod
    def of(cls, model_name: str, tag: str, error: BaseException) -> "WeightsDownloadError":
        offline, cause = download_failure(error)
        source = weights_source(model_name, tag)
        where = f" from {source}" if source else ""
        fix = ("on a machine with internet access download that file, then pass its path with "
               "--pretrained PATH" if offline else "check the cause, or download the checkpoint "
               "and pass its path with --pretrained PATH")
        return cls(f"could not load pretrained weights {model_name}/{tag}{where}: {cause}. Fix: "
                   f"{fix} (or --pretrained none for random weights)",
                   cause=cause, source=source, offline=offline)


def weights_source(model_name: str, tag: str) -> str:
    """Where open_clip fetches ``model_name``/``tag`` from, read off its pretrained config: the
    Hugging Face Hub repository and file (open_clip tries the .safetensors alternative of the
    default file first), else (without huggingface_hub) the URL; '' if open_clip has no config for it."""
    try:
        from open_clip import pretrained as oc_pretrained
        cfg = oc_pretrained.get_pretrained_cfg(model_name, tag) or {}
    except Exception:
        return ""
    has_hub = getattr(oc_pretrained, "has_hf_hub", lambda: True)()
    if cfg.get("hf_hub") and (has_hub or not cfg.get("url")):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or getattr(oc_pretrained, "HF_WEIGHTS_NAME",
                                       "open_clip_pytorch_model.bin")
        alternatives = getattr(oc_pretrained, "_get_safe_alternatives", lambda name: ())
        names = [*alternatives(filename), filename]
        return (f"Hugging Face Hub repository {repo}, file {names[0]}"
                + "".join(f" (or {n})" for n in names[1:]))
    return f"URL {cfg['url']}" if cfg.get("url") else ""


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what caused it (``__cause__``, else ``__context__``), outermost first."""
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def download_failure(error: BaseException) -> tuple[bool, str]:
    """-> (whether the cause is no network connection, the cause in words). open_clip wraps the
    download's exception (RuntimeError around FileNotFoundError around huggingface_hub's), so
    the whole chain is read; any other cause is named by its innermost exception."""
    chain = _chain(error)
    network = [e for e in chain if isinstance(e, (ConnectionError, TimeoutError))
               or any(c.__name__ in NETWORK_ERRORS for c in type(e).__mro__)]
    if network and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return True, "offline mode (HF_HUB_OFFLINE is set) and the file is not in the local cache"
    if network:
        return True, f"no network connection: {type(network[-1]).__name__}"
    inner = chain[-1]
    text = (str(inner).strip().splitlines() or [""])[0]
    text = text if len(text) <= 120 else text[:117] + "..."
    return False, f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("clipinspect", "torch", "open_clip_torch", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_clip(model_name: str, pretrained: str | None, seed: int = 0, *,
              warn_random: bool = True):
    """-> (model in eval mode, tokenizer, weights record for the manifest).

    pretrained: an open_clip tag, a local open_clip checkpoint file, or None / "none" for a
    seeded random init (recorded, and warned about unless the caller already did:
    ``warn_random=False``).
    """
    import open_clip

    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower()[:5] in m.lower()][:8]
        raise ExportError(f"unknown open_clip model {model_name!r}"
                          + (f"; similar: {', '.join(close)}" if close else "")
                          + ". See open_clip.list_models()")
    if pretrained in (None, "", "none", "None"):
        if warn_random:
            log(RANDOM_WEIGHTS_WARNING)
        torch.manual_seed(seed)
        with _quiet_loggers("root"):
            model = open_clip.create_model(model_name, pretrained=None)
        weights = {"kind": "random", "seed": seed}
    elif os.path.isfile(pretrained):
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as e:  # open_clip raises several types for a wrong checkpoint
            raise ExportError(f"could not load checkpoint {pretrained!r} into {model_name}: {e}. "
                              "Is it an open_clip checkpoint of this model?") from e
        weights = {"kind": "file", "path": str(Path(pretrained).resolve()),
                   "sha256": sha256_file(Path(pretrained))}
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            hint = f"known tags for {model_name}: {', '.join(tags) or 'none'}"
            if os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
                hint = f"no such file ({hint})"
            raise ExportError(f"--pretrained {pretrained!r} is neither a local checkpoint file nor "
                              f"an open_clip tag; {hint}; or 'none' for random weights")
        try:
            with _quiet_loggers("huggingface_hub", "root", level=logging.CRITICAL):  # retries;
                # open_clip logs the failure at ERROR: our error says more
                model = open_clip.create_model(model_name, pretrained=pretrained)
        except Exception as e:
            raise WeightsDownloadError.of(model_name, pretrained, e) from e
        weights = {"kind": "tag", "tag": pretrained}
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    weights["text_probe"] = text_probe(model, tokenizer)
    return model, tokenizer, weights


@contextlib.contextmanager
def _quiet_loggers(*names: str, level: int = logging.ERROR):
    """Silence other libraries' warnings (and below ``level``) where ours say more (random init,
    download retries)."""
    loggers = [logging.getLogger(None if n == "root" else n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def text_probe(model, tokenizer) -> list[float]:
    """A fingerprint of the text tower: lets add-category prove it loaded the same weights."""
    return [round(float(v), 6) for v in encode_texts(model, tokenizer, [PROBE_PROMPT])[0, :16]]


def preprocess_config(model) -> dict:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = model.visual.image_size
    size = [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    return {"size": size, "mean": [float(v) for v in cfg.get("mean", OPENAI_DATASET_MEAN)],
            "std": [float(v) for v in cfg.get("std", OPENAI_DATASET_STD)],
            "resize": "bicubic-antialiased, whole image, no crop", "layout": "NCHW float32 RGB"}

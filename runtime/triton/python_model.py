"""``clipinspect triton --platform python``: the bundle's ONNX graphs run by onnxruntime inside
Triton's Python backend.

For Triton servers without the onnxruntime backend (e.g. the ``tritonserver`` binary of the
``nvidia-pytriton`` wheel, CPU only) and for testing a repository on a laptop or in CI. The
repository is the one the ``onnx`` platform writes (same graphs, dynamic batching, ensembles and
categories model); only the encoder and heads become Python-backend models, and the categories
model gets the same environment. GPU servers use ``--platform onnx`` or ``tensorrt``.

This file is copied as ``model.py`` into those models' version folders. Triton's Python stub
starts with its own interpreter's ``sys.path`` (it ignores PYTHONPATH), so the model adds the
site-packages that hold numpy and onnxruntime, recorded in its config by ``clipinspect triton``
(parameter ``clipinspect_site_packages``, a JSON list: edit it when the server's environment
differs), before importing them. Nothing here imports clipinspect.
"""

import importlib.util
import json
import os
import re
import shutil
import site
from pathlib import Path

SITE_PACKAGES = "clipinspect_site_packages"
PROVIDERS = "clipinspect_providers"
# Another model's code (the categories model) run after the site-packages are added.
MODEL_CODE = "clipinspect_model_code"
DEFAULT_PROVIDERS = ["CPUExecutionProvider"]


# ------------------------------------------------------------------ inside Triton's Python stub
class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for path in json.loads(params.get(SITE_PACKAGES, "[]")):
            site.addsitedir(path)  # addsitedir, not sys.path: .pth files there count too
        here = os.path.join(args["model_repository"], args["model_version"])
        if MODEL_CODE in params:
            spec = importlib.util.spec_from_file_location(
                "clipinspect_" + config["name"], os.path.join(here, params[MODEL_CODE]))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self.model = module.TritonPythonModel()
            self.model.initialize(args)
        else:
            providers = json.loads(params[PROVIDERS]) if PROVIDERS in params else DEFAULT_PROVIDERS
            self.model = _OnnxModel(config, os.path.join(here, "model.onnx"), providers)

    def execute(self, requests):
        return self.model.execute(requests)


class _OnnxModel:
    """One ONNX graph; a batching model (``max_batch_size`` > 0) runs all requests the dynamic
    batcher hands it as one batch, the others run request by request."""

    def __init__(self, config, graph, providers):
        import onnxruntime as ort

        self.session = ort.InferenceSession(graph, providers=providers)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        feeds = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs}
                 for r in requests]
        try:
            if self.batched:
                import numpy as np

                sizes = [len(f[self.inputs[0]]) for f in feeds]
                joined = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
                outputs = self.session.run(self.outputs, joined)
                bounds = np.cumsum(sizes)[:-1]
                per_request = zip(*(np.split(o, bounds) for o in outputs))
            else:
                per_request = [self.session.run(self.outputs, f) for f in feeds]
            return [pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(n, a) for n, a in zip(self.outputs, arrays)])
                for arrays in per_request]
        except Exception as e:  # the requests fail, the model keeps serving
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{type(e).__name__}: {e}")) for _ in requests]


# ------------------------------------------------------------------ writing (clipinspect triton)
def site_packages() -> list[str]:
    """The folders numpy and onnxruntime are imported from in this environment."""
    from ..core.errors import UsageError  # here: the model code in Triton never imports this

    folders = []
    for module in ("numpy", "onnxruntime"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise UsageError(
                f"--platform python runs the graphs with onnxruntime inside Triton's Python "
                f"backend, but {module} is not installed here: pip install 'clipinspect[cpu]', "
                f"or use --platform onnx for a server with the onnxruntime backend")
        folder = str(Path(spec.origin).parent.parent)
        if folder not in folders:
            folders.append(folder)
    return folders


def _parameter(key: str, value: str) -> str:
    from .pbtxt import pbtxt_string  # here: the model code in Triton never imports this

    return (f"parameters {{\n  key: {pbtxt_string(key)}\n  value: {{\n"
            f"    string_value: {pbtxt_string(value)}\n  }}\n}}\n")


def as_python_models(repo: Path, configs: dict[str, str], graph_models: list[str],
                     categories: str) -> None:
    """Turn the graph models of a repository being written (``configs``: name -> config text,
    graphs already placed as ``<name>/1/model.onnx``) into Python-backend models running those
    graphs on the CPU, and give the categories model the same environment."""
    paths = _parameter(SITE_PACKAGES, json.dumps(site_packages()))
    for name in graph_models:
        text = re.sub(r'^platform: ".*"$', 'backend: "python"', configs[name], count=1,
                      flags=re.M)
        configs[name] = (text.replace("kind: KIND_GPU", "kind: KIND_CPU") + paths
                         + _parameter(PROVIDERS, json.dumps(DEFAULT_PROVIDERS)))
        shutil.copy2(__file__, repo / name / "1" / "model.py")
    version = repo / categories / "1"
    os.replace(version / "model.py", version / "categories.py")
    shutil.copy2(__file__, version / "model.py")
    configs[categories] += paths + _parameter(MODEL_CODE, "categories.py")

"""Triton Python-backend model serving each category's text prototypes and few-shot memory.

Copied by ``clipinspect triton`` to ``clipinspect_categories/1/model.py``; it imports neither
clipinspect nor anything beyond numpy, so it runs in a stock Triton container. The arrays live
next to it::

    1/categories/<category, spaces as '_'>/text.npz     text_prototypes (2, D) float32 [+ prompt pools]
    1/categories/<category, spaces as '_'>/memory.npz   few-shot memory (optional)

Adding a category or new reference images means adding or replacing these files (``clipinspect
triton BUNDLE --out REPO --categories-only`` writes them atomically); the files are re-read when
they change, so no engine is rebuilt and the server is not restarted.
"""

import os
import re

import numpy as np
import triton_python_backend_utils as pb_utils

# The bundle's rule for category names (runtime/core/manifest.py CATEGORY_NAME, mirrored: this
# file imports no clipinspect): no '/', '.' never first, so no path escapes. fullmatch, since
# '$' would also accept a trailing newline.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}")


class TritonPythonModel:
    def initialize(self, args):
        self.root = os.path.join(args["model_repository"], args["model_version"], "categories")
        self.cache = {}

    def load(self, name):
        """{output name: array} of one category, re-read when its files change."""
        if not NAME.fullmatch(name):
            raise ValueError(f"invalid category name {name!r}")
        folder = os.path.join(self.root, name.replace(" ", "_"))
        text = os.path.join(folder, "text.npz")
        memory = os.path.join(folder, "memory.npz")
        if not os.path.isfile(text):
            known = sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
            raise ValueError(f"unknown category {name!r}; this repository has: "
                             f"{', '.join(known) or 'none'}")
        stamp = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in (text, memory))
        cached = self.cache.get(name)
        if cached is None or cached[0] != stamp:
            with np.load(text) as npz:
                arrays = {k: npz[k].astype(np.float32) for k in npz.files}
            if os.path.exists(memory):
                with np.load(memory) as mem:
                    arrays.update({k: mem[k].astype(np.float32) for k in mem.files})
            cached = (stamp, arrays)
            self.cache[name] = cached
        return cached[1]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                value = pb_utils.get_input_tensor_by_name(request, "category").as_numpy()
                name = value.reshape(-1)[0]
                name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
                arrays = self.load(name)
                tensors = []
                for output in request.requested_output_names():
                    if output not in arrays:
                        raise ValueError(f"category {name!r} has no reference images (no "
                                         f"{output}); use the zero-shot model or add them")
                    tensors.append(pb_utils.Tensor(output, arrays[output]))
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # one bad request must not fail the others in its batch
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses

"""The runtime stays lean: importing it (and building the CLI) pulls in no torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import clipinspect.runtime
from clipinspect.runtime.cli import build_parser
from clipinspect.runtime import Inspector, predict
from clipinspect.runtime.core import maps
from clipinspect.runtime.serving import journal, server, watch
build_parser()
heavy = sorted(m for m in ("torch", "open_clip", "torchvision", "onnx") if m in sys.modules)
print(",".join(heavy) or "clean")
"""


def test_runtime_import_does_not_load_torch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_runtime_sources_never_import_export_or_torch():
    from pathlib import Path

    import clipinspect.runtime as runtime

    for path in Path(runtime.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for banned in ("import torch", "from torch", "open_clip", "clipinspect.export",
                       "clipinspect.calibration"):
            assert banned not in text, f"{path.name} mentions {banned!r}"

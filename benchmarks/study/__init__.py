"""``clipinspect study``: methods x prompt strategies x shots x precisions, on the same images,
in one report (docs/study.md).

spec: the study file and its variants; bundles: export and quantize into a cache; runner:
evaluation with calibration's own code, resumable, one child process per variant; report and
plots: JSON, Markdown, HTML, accuracy-vs-speed and shots plots.
"""

from .report import render_html, render_markdown, write_reports
from .runner import RunOptions, run_study
from .spec import Study, Variant, load_study, study_from_dict

__all__ = ["RunOptions", "Study", "Variant", "load_study", "render_html", "render_markdown",
           "run_study", "study_from_dict", "write_reports"]

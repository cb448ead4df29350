"""Every committed result under benchmarks/results/ names the command that reproduces it, and that
command still works: each one is run here in a tiny form (tiny bundles of tests/tinybundle.py or
the random-weight test model, a few images, one round), so a benchmark script that moves or changes
its options without its results being updated fails here.

The tiny form is the recorded command with its placeholders (BUNDLE, DATA, DIR, WORK, the
methods' bundle names) pointed at tiny inputs, ``--out`` at a temporary folder, and the options
that set the size of the run (rounds, images, durations) made small; every other option is run
as recorded. Two commands cannot run here and are parsed instead, by the script's own parser:
``triton_vs_serve`` (it installs a Triton server and perf_analyzer from PyPI) and the study
script (minutes of adapter training; ``clipinspect study`` itself runs in tests/test_study.py).
"""

from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from experiment_scripts import EXPERIMENTS, load
from line_components import aravis_missing
from conftest import SMALL_MODEL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The per-variant records of a study, written and reused by the study itself (its command is
# the study's, in study.json).
STUDY_PARTS = RESULTS / "study_synthetic" / "results"
COMMAND_LINE = re.compile(r"^Command: `(.+)`$", re.M)
# What makes a run long, and the tiny value every command here runs with (where it has it).
TINY = {"--rounds": "1", "--images": "2", "--shots": "1", "--batch-size": "2", "--runs": "1",
        "--warmup": "1", "--duration": "1", "--clients": "1", "--images-per-category": "1",
        "--batch-sizes": "1", "--stream-frames": "2", "--stream-fps": "50", "--draws": "1",
        "--epochs": "1", "--requests": "2", "--megapixels": "0.3", "--slow-connections": "2",
        "--body-timeout": "2", "--idle-sockets": "4", "--calibration-images": "2",
        "--pixel-size": "32", "--threads": "1"}
# Per program: options added or replaced beyond TINY (sizes the recorded command leaves at a
# large default, a torch-free stand-in, one category).
SMALL = {"--images": "2", "--shots": "1", "--batch-size": "2", "--rounds": "1"}
EXTRA = {
    "clipinspect bench": {"--no-baseline": None},
    "clipinspect eval": {"--categories": "weave", "--shots": "0,1"},
    "clipinspect loadtest": {"--categories": "weave"},
    "python benchmarks/experiments/precisions.py": SMALL,
    "python benchmarks/experiments/int8_speedup.py": {**SMALL, "--batch-sizes": "1"},
    "python benchmarks/experiments/memload.py": {"--slow-connections": "2",
                                                 "--body-timeout": "1"},
    "python benchmarks/experiments/mixed_categories.py": {"--images-per-category": "1"},
    "python benchmarks/experiments/aprillab_training.py": {"--categories": "weave"},
    "python benchmarks/experiments/alfa_pool_size.py": {"--categories": "weave"},
    "python benchmarks/experiments/winclip_vs_torch.py": {**SMALL, "--model": SMALL_MODEL,
                                                          "--batch-size": "1"},
    "python -m clipinspect.benchmarks.rss_probe": {"--decoding": "whole"},
    "python benchmarks/experiments/station_line_rate.py": {"--max-trials": "1"},
    "python benchmarks/experiments/drift_delay.py": {"--parts": "600", "--seeds": "1",
                                                     "--pool": "32"},
    "python benchmarks/experiments/musc_speed.py": {"--models": SMALL_MODEL, "--pools": "6",
                                                    "--memory-pools": "6", "--repeats": "1",
                                                    "--settle": "0"},
    "python benchmarks/experiments/musc_blind_spot.py": {
        "--seeds": "1", "--length": "12", "--window": "6", "--pool-size": "6",
        "--seed-parts": "4", "--calibration": "4", "--model": SMALL_MODEL},
}
PARSED_ONLY = {"python benchmarks/experiments/triton_vs_serve.py": "triton_vs_serve",
               "sh benchmarks/studies/synthetic.sh": "study"}
# The study script trains adapters (train-adapters); without torch its command line does not
# even parse.
NEEDS_TORCH = ("winclip_vs_torch.py", "aprillab_training.py", "alfa_pool_size.py",
               "studies/synthetic.sh", "musc_speed.py", "musc_blind_spot.py")


def result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.suffix in (".json", ".md")
                  and p.name != "README.md" and STUDY_PARTS not in p.parents
                  and not p.name.startswith("int8_notes"))


def recorded_command(path: Path) -> str | None:
    if path.suffix == ".json":
        return json.loads(path.read_text()).get("command")
    found = COMMAND_LINE.search(path.read_text())
    return found.group(1) if found else None


def commands() -> dict[str, str]:
    """Recorded command -> the first result (JSON) that records it; of commands that differ only
    in option values (a trial run and the final one), one is run."""
    out: dict[str, str] = {}
    shapes = set()
    for path in result_files():
        if path.suffix == ".json" and (cmd := recorded_command(path)):
            tokens = shlex.split(cmd)
            shape = (program(tokens), tuple(t for t in tokens if t.startswith("--")))
            if shape not in shapes:
                shapes.add(shape)
                out[cmd] = str(path.relative_to(RESULTS))
    return out


def program(tokens: list[str]) -> str:
    if tokens[0] == "clipinspect":
        return " ".join(tokens[:2])
    return " ".join(tokens[:3] if tokens[:2] == ["python", "-m"] else tokens[:2])


def test_every_result_file_names_its_command_and_both_files_agree():
    missing = [str(p.relative_to(RESULTS)) for p in result_files() if not recorded_command(p)]
    assert not missing, f"result files without the command that made them: {missing}"
    for path in result_files():
        twin = path.with_suffix(".md" if path.suffix == ".json" else ".json")
        if path.suffix == ".json" and twin.is_file():
            assert recorded_command(twin) == recorded_command(path), path


def test_every_benchmark_command_named_in_the_docs_exists():
    """Results' notes and READMEs, docs and READMEs: a script or module they name is there."""
    texts = [*RESULTS.rglob("*.md"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md",
             ROOT / "benchmarks" / "README.md"]
    scripts, modules = set(), set()
    for path in texts:
        text = path.read_text()
        scripts |= set(re.findall(r"benchmarks/experiments/(\w+)\.py", text))
        modules |= set(re.findall(r"python -m clipinspect\.benchmarks\.(\w+)", text))
    assert scripts and modules
    assert sorted(s for s in scripts if not (EXPERIMENTS / f"{s}.py").is_file()) == []
    package = ROOT / "benchmarks"
    assert sorted(m for m in modules if not (package / f"{m}.py").is_file()) == []


def test_the_experiments_are_not_installed():
    """benchmarks/experiments/ is no package: no __init__, not listed in pyproject.toml."""
    assert not (EXPERIMENTS / "__init__.py").exists()
    assert "experiments" not in (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]")[1] \
        .split("]")[0]


# --------------------------------------------------------------------------- tiny inputs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One set of tiny inputs for every command: a WinCLIP bundle with FP16 and INT8 graphs
    (weave, washer), patch bundles with and without adaptation, and a small synthetic dataset
    (also the calibration images)."""
    from tinybundle import build_tiny_bundle

    from clipinspect.calibration import quantize as q
    from clipinspect.calibration.synth import generate

    root = tmp_path_factory.mktemp("benchmark-commands")
    data = root / "data"
    generate(data, seed=0, categories=["weave", "washer"], image_size=64, n_train=2,
             n_test_good=1, n_test_defect_per_type=1)
    bundle = build_tiny_bundle(root / "b16p-winclip", ("weave", "washer")).root
    q.quantize_bundle(bundle, "int8", data, holdout=1, max_images=3, sensitivity="off")
    q.quantize_bundle(bundle, "fp16", holdout=1)
    build_tiny_bundle(root / "b16p-patch", ["weave"], "patch")
    build_tiny_bundle(root / "b16p-patch-adapt", ["weave"], "patch", adaptation={"tau": 0.01})
    return {"BUNDLE": str(bundle), "DATA": str(data), "DIR": str(data / "weave" / "train"),
            "b16p-winclip": str(bundle), "b16p-patch": str(root / "b16p-patch"),
            "b16p-patch-adapt": str(root / "b16p-patch-adapt"), "data/synthetic": str(data)}


def tiny_form(command: str, inputs: dict[str, str], tmp: Path) -> list[str]:
    """The recorded command, its placeholders pointed at ``inputs``, ``--out`` and ``--work`` at
    ``tmp``, the options of TINY it has made small, those of EXTRA set."""
    tokens = shlex.split(command)
    out = [inputs.get(t, t) for t in tokens]

    def put(option: str, value: str | None, add: bool) -> None:
        if option in out:
            if value is not None:
                out[out.index(option) + 1] = value
        elif add:
            out.extend([option] if value is None else [option, value])
    for option, value in TINY.items():
        put(option, value, add=False)
    for option, value in EXTRA.get(program(tokens), {}).items():
        put(option, value, add=True)
    put("--out", str(tmp / "out" / "result"), add=True)
    put("--work", str(tmp / "work"), add=False)
    return out


def run(tokens: list[str]) -> int:
    """Run a command line here, as the shell would from the repository root: ``clipinspect``
    through its entry point, ``python script`` and ``python -m module`` as ``__main__``."""
    from clipinspect.runtime.cli import main

    old = sys.argv
    try:
        if tokens[0] == "clipinspect":
            return main(tokens[1:])
        if tokens[:2] == ["python", "-m"]:
            sys.argv = [tokens[2], *tokens[3:]]
            with warnings.catch_warnings():  # the module is imported already (by bench): fine
                warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
                runpy.run_module(tokens[2], run_name="__main__", alter_sys=True)
        else:
            assert tokens[0] == "python", tokens
            sys.argv = [str(ROOT / tokens[1]), *tokens[2:]]
            runpy.run_path(str(ROOT / tokens[1]), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def _params():
    out = []
    for command, source in commands().items():
        marks = [pytest.mark.torch] if any(s in command for s in NEEDS_TORCH) else []
        if "station_line_rate.py" in command and (why := aravis_missing()):
            marks.append(pytest.mark.skip(reason=why))
        out.append(pytest.param(command, id=source, marks=marks))
    return out


@pytest.mark.parametrize("command", _params())
def test_the_command_of_each_result_runs_in_a_tiny_form(command, tiny, tmp_path, monkeypatch,
                                                         request):
    tokens = shlex.split(command)
    if program(tokens) in PARSED_ONLY:
        return parse_only(tokens, tiny)
    monkeypatch.chdir(tmp_path)  # nothing a command writes lands in the repository
    tiny_tokens = tiny_form(command, tiny, tmp_path)
    if "winclip_vs_torch.py" in command:
        # The random-weight SMALL_MODEL export the other tests share (a copy: its memory is
        # replaced), instead of the script exporting one of its own.
        tiny_tokens += ["--bundle", str(request.getfixturevalue("bundle_copy"))]
    assert run(tiny_tokens) == 0, shlex.join(tiny_tokens)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written, f"{shlex.join(tiny_tokens)} wrote no result"
    result = next((p for p in written if p.suffix == ".json"), None)
    if result is not None and "eval" not in command:
        assert json.loads(result.read_text()).get("command"), f"{result} records no command"


def parse_only(tokens: list[str], inputs: dict[str, str]) -> None:
    if PARSED_ONLY[program(tokens)] == "triton_vs_serve":
        args = load("triton_vs_serve").parse([inputs.get(t, t) for t in tokens[2:]])
        assert args.methods and args.concurrency
        return
    from clipinspect.benchmarks.study.spec import load_study
    from clipinspect.runtime.cli import build_parser

    script = (ROOT / tokens[1]).read_text().replace("\\\n", " ")
    parser, lines = build_parser(), []
    for line in script.splitlines():
        line = line.strip().replace("$W", "WORK").replace('"$@"', "")
        if line.startswith("clipinspect "):
            lines.append(line)
            args = parser.parse_args(shlex.split(line)[1:])
            if getattr(args, "study", None):
                assert load_study(ROOT / args.study).variants
    assert any(" study " in f" {line} " for line in lines), lines


def test_a_tiny_form_keeps_the_recorded_options():
    inputs = {"BUNDLE": "/b"}
    tokens = tiny_form("python benchmarks/experiments/precisions.py BUNDLE --precisions fp32,int8 "
                       "--rounds 5 --out benchmarks/results/x", inputs, Path("/t"))
    assert tokens == ["python", "benchmarks/experiments/precisions.py", "/b", "--precisions",
                      "fp32,int8", "--rounds", "1", "--out", "/t/out/result", "--images", "2",
                      "--shots", "1", "--batch-size", "2"]
    tokens = tiny_form("clipinspect bench BUNDLE --out o --runs 3", inputs, Path("/t"))
    assert tokens == ["clipinspect", "bench", "/b", "--out", "/t/out/result", "--runs", "1",
                      "--no-baseline"]

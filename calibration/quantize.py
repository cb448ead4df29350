"""``clipinspect quantize``: FP16 and INT8 variants of a bundle's encoder graph.

FP16: every float tensor in half precision except the attention softmax (its exponentials
overflow FP16 and its small differences are what ranks tokens) and LayerNormalization (its
variance overflows FP16): both run in FP32 between Cast nodes written into the graph. The graph
itself carries that, because TensorRT builds strongly typed engines from the tensor types and
ignores ``stash_type`` (the FP32 accumulation an FP16 LayerNormalization would otherwise ask
for). Inputs and outputs stay FP32, so the runtime feeds and reads the same arrays for every
precision.

INT8: static quantization in QDQ form of every MatMul with a weight: weights signed 8-bit,
symmetric, one scale per output channel; activations signed 8-bit, symmetric, one scale per
tensor, from calibration on normal images; all zero points 0. That one graph is what TensorRT's
explicit quantization requires, and onnxruntime runs it on the CPU (VNNI kernels on x86) and
with CUDA.

The scoring heads (cosines, softmax over two classes, harmonic aggregation, nearest-neighbour
search) stay FP32 in every variant: they are a small share of the work, and they are where
rounding would reorder scores.

A sensitivity pass keeps the weights whose quantization hurts the anomaly maps most in FP32
until the maps of held-out normal images agree with FP32 (Pearson correlation) at a target.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from clipinspect.runtime import Bundle, Inspector
from clipinspect.runtime.core.bundle import write_versioned
from clipinspect.runtime.core.errors import ClipInspectError, UsageError
from clipinspect.runtime.core.images import IMAGE_SUFFIXES, ImageError, to_rgb_array
from clipinspect.runtime.core.int8_kernels import FULL_WEIGHT_MAX, weight_max
from clipinspect.runtime.core.manifest import (Agreement, Calibration, Quantization, Scheme,
                                               Sensitivity, WeightRank)
from clipinspect.runtime.core.names import FUSED_ENCODER
from clipinspect.runtime.core.names import QUANTIZED_PRECISIONS as PRECISIONS
from clipinspect.runtime.core.progress import Progress

from .quantize_fp16 import register  # int8 also gets its FP16-between-Q/DQ graph

METHODS = ("minmax", "entropy", "percentile")
FP16_KEEP_FP32 = ("Softmax", "LayerNormalization")
DEFAULT_TARGET = 0.99
DEFAULT_HOLDOUT = 3
#: A bundle whose images score each other (MuSc's batch mode) checks its maps on held-out images
#: scored together: at least 5 (each against 4 others).
POOL_HOLDOUT = 5
DEFAULT_MAX_IMAGES = 32
MIN_CALIBRATION_IMAGES = 2


class QuantizeError(ClipInspectError, RuntimeError):
    """A precision variant that cannot be made as asked; the message says what to do."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ graphs
def clean_graph(path: Path):
    """The graph after onnxruntime's provider-independent optimizations (constant folding,
    Identity removal): each shared weight becomes one initializer that a MatMul reads directly."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="clipinspect-quantize-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "clean.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


def to_fp16(model):
    """FP16 graph with FP32 inputs and outputs; FP16_KEEP_FP32 ops stay FP32, with their
    weights (LayerNormalization's scale and bias), a Cast to FP32 before and to FP16 after."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = list(DEFAULT_OP_BLOCK_LIST) + list(FP16_KEEP_FP32)
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=keep)


@dataclass
class WeightGroup:
    """One weight matrix (K, N) and the MatMul nodes that read it (a weight is shared by the
    full-image pass and the window passes of every scale)."""

    index: int
    weight: str
    nodes: list[str]
    shape: tuple[int, int]

    @property
    def label(self) -> str:
        return (f"#{self.index:02d} {self.nodes[0]} ({self.shape[0]}x{self.shape[1]}, "
                f"{len(self.nodes)} node{'s' if len(self.nodes) > 1 else ''})")


def weight_groups(model) -> list[WeightGroup]:
    """MatMuls whose second input is a 2-D float weight, grouped by weight, in graph order."""
    import onnx

    inits = {t.name: t for t in model.graph.initializer}
    groups: dict[str, WeightGroup] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2:
            continue
        if w.name not in groups:
            groups[w.name] = WeightGroup(len(groups), w.name, [], (int(w.dims[0]), int(w.dims[1])))
        groups[w.name].nodes.append(node.name)
    return list(groups.values())


def activation_products(model) -> list[str]:
    """MatMuls whose both inputs are activations (the attention products QK^T and attention x
    V), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[0] not in inits and n.input[1] not in inits]


WEIGHT_RANGES = ("auto", "full", "reduced")


def weights_scheme(wmax: int) -> str:
    """How the weights are quantized, as the manifest records it."""
    return f"int8 in [-{wmax}, {wmax}], symmetric, per output channel, zero point 0"


class _QdqNodes:
    """The Quantize/DequantizeLinear nodes and initializers a quantized copy of ``graph`` adds,
    under fresh tensor names: each weight and each activation is quantized once, however many
    MatMuls read it. ``nodes`` collects the new graph's nodes in order."""

    def __init__(self, graph, activation_amax: dict[str, float],
                 weight_max: int = FULL_WEIGHT_MAX):
        self.weight_max = weight_max
        self.inits = {t.name: t for t in graph.initializer}
        self.taken = set(self.inits) | {o for n in graph.node for o in n.output}
        self.activation_amax = activation_amax
        self.nodes: list = []
        self.new_inits: list = []
        self._weight_dq: dict[str, str] = {}
        self._act_dq: dict[str, str] = {}

    def fresh(self, name: str) -> str:
        if name in self.taken:
            raise QuantizeError(f"graph already has a tensor named {name!r}; export it again")
        self.taken.add(name)
        return name

    def weight(self, w: str) -> str:
        """The dequantized form of weight ``w``: int8, symmetric, one scale per output channel."""
        from onnx import helper, numpy_helper

        if w not in self._weight_dq:
            wf = numpy_helper.to_array(self.inits[w]).astype(np.float32)  # (K, N)
            top = self.weight_max
            scale = np.maximum(np.abs(wf).max(axis=0), 1e-12) / float(top)  # (N,)
            q = np.clip(np.rint(wf / scale), -top, top).astype(np.int8)
            names = [self.fresh(f"{w}_int8"), self.fresh(f"{w}_scale"),
                     self.fresh(f"{w}_zero_point")]
            self.new_inits.extend([numpy_helper.from_array(q, names[0]),
                                   numpy_helper.from_array(scale.astype(np.float32), names[1]),
                                   numpy_helper.from_array(np.zeros(q.shape[1], np.int8),
                                                           names[2])])
            self._weight_dq[w] = self.fresh(f"{w}_dequantized")
            self.nodes.append(helper.make_node("DequantizeLinear", names, [self._weight_dq[w]],
                                               axis=1, name=self.fresh(f"{w}_DequantizeLinear")))
        return self._weight_dq[w]

    def activation(self, x: str, node) -> str:
        """Activation ``x`` through a Q/DQ pair: int8, symmetric, one scale per tensor."""
        from onnx import helper, numpy_helper

        if x not in self._act_dq:
            if x not in self.activation_amax:
                raise QuantizeError(f"no calibration range for {x!r} (input of {node.name})")
            s = max(float(self.activation_amax[x]), 1e-12) / 127.0
            names = [self.fresh(f"{x}_scale"), self.fresh(f"{x}_zero_point")]
            self.new_inits.extend([numpy_helper.from_array(np.array(s, np.float32), names[0]),
                                   numpy_helper.from_array(np.array(0, np.int8), names[1])])
            q_out, self._act_dq[x] = self.fresh(f"{x}_quantized"), self.fresh(f"{x}_dequantized")
            self.nodes.append(helper.make_node("QuantizeLinear", [x, *names], [q_out],
                                               name=self.fresh(f"{x}_QuantizeLinear")))
            self.nodes.append(helper.make_node("DequantizeLinear", [q_out, *names],
                                               [self._act_dq[x]],
                                               name=self.fresh(f"{x}_DequantizeLinear")))
        return self._act_dq[x]


def quantize_int8(model, groups: Sequence[WeightGroup], activation_amax: dict[str, float],
                  exclude: set[str] = frozenset(), *, products: Sequence[str] = (),
                  weight_max: int = FULL_WEIGHT_MAX):
    """A copy of ``model`` with QDQ pairs around every MatMul of ``groups`` except the
    weights in ``exclude``, and around both inputs of the activation x activation MatMuls named
    in ``products``. activation_amax: calibrated max |value| of each MatMul input;
    ``weight_max``: the largest |int8 weight| (63: the reduced range of int8_kernels.py)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    chosen = {g.weight for g in groups if g.weight not in exclude}
    products = set(products)
    qdq = _QdqNodes(graph, activation_amax, weight_max)
    for node in graph.node:
        with_weight = node.op_type == "MatMul" and node.input[1] in chosen
        if with_weight or node.name in products:
            inputs = (qdq.activation(node.input[0], node),
                      qdq.weight(node.input[1]) if with_weight
                      else qdq.activation(node.input[1], node))
            quantized = onnx.NodeProto()
            quantized.CopyFrom(node)
            quantized.input[0], quantized.input[1] = inputs
            qdq.nodes.append(quantized)
        else:
            qdq.nodes.append(node)
    still_read = {i for n in qdq.nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.node[:]
    graph.node.extend(qdq.nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + qdq.new_inits)
    return out


# ------------------------------------------------------------------------------ calibration
def find_images(source: str | Path) -> list[Path]:
    """Normal images for calibration: the normal training images of every category when
    ``source`` is an MVTec AD / VisA root (interleaved across categories), else every image
    file under the directory (recursively, sorted)."""
    from .datasets import DatasetError, detect_format, load_dataset

    root = Path(source)
    if not root.is_dir():
        raise UsageError(f"--calibration {str(root)!r} is not a directory; pass a folder of "
                         "normal images or an MVTec AD / VisA dataset root")
    try:
        fmt = detect_format(root)
    except DatasetError:
        fmt = None
    if fmt is not None:
        per_category: dict[str, list[Path]] = {}
        for s in load_dataset(root, fmt, None, split="train"):
            if not s.is_anomalous:
                per_category.setdefault(s.category, []).append(Path(s.path))
        lists = list(per_category.values())
        paths = [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists
                 if i < len(lst)]
    else:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file() and not p.stem.endswith("_mask"))
    if not paths:
        raise UsageError(f"no images found under {str(root)!r} (looked for "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def load_tensors(bundle: Bundle, paths: Sequence[Path]) -> np.ndarray:
    """(N, 3, H, W) preprocessed images; an unreadable file is an error naming it."""
    out = []
    for p in paths:
        try:
            out.append(bundle.preprocess(to_rgb_array(p)))
        except ImageError as e:
            raise UsageError(f"calibration image {str(p)!r} cannot be used ({e}); remove it or "
                             "replace it") from e
    return np.stack(out)


def probe_images(bundle: Bundle, n: int) -> np.ndarray:
    """Deterministic synthetic normal images, for agreement checks when the user gave none."""
    from .synth import CATEGORIES, render_sample

    names = list(CATEGORIES)
    rgbs = [render_sample(names[i % len(names)], "train", "good", i)[0] for i in range(n)]
    return bundle.preprocess.batch(rgbs)


class _OneImage:
    """onnxruntime's CalibrationDataReader protocol, for one image at a time."""

    def __init__(self, image: np.ndarray):
        self._items = [{"images": image[None]}]

    def get_next(self):
        return self._items.pop() if self._items else None


def activation_ranges(model_path: Path, images: np.ndarray, method: str,
                      progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Max |value| of every MatMul input over the calibration images (``method``: minmax,
    entropy or percentile, as onnxruntime's calibrators compute them), one image at a time so
    memory stays bounded."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UsageError(f"unknown calibration method {method!r}: choose one of "
                         f"{', '.join(METHODS)}")
    # One image per collect_data call: each call folds its tensors into the running ranges
    # (minmax) or histograms and drops them, so memory does not grow with the image count.
    extra = {} if method == "minmax" else {"symmetric": True}
    with tempfile.TemporaryDirectory(prefix="clipinspect-calibrate-") as tmp:
        calibrator = create_calibrator(str(model_path), ["MatMul"],
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=methods[method], extra_options=extra)
        for image in images:
            calibrator.collect_data(_OneImage(image))
            if progress:
                progress(1)
        data = calibrator.compute_data()
    amax = {}
    for name, value in data.data.items():
        lo, hi = (np.asarray(v, dtype=np.float64).ravel() for v in value.range_value)
        amax[name] = float(max(np.abs(lo).max(), np.abs(hi).max()))
    return amax


# -------------------------------------------------------------------------------- agreement
class MapAgreement:
    """Scores a fixed set of images with a candidate encoder and the bundle's FP32 heads, for
    every category (zero-shot, and few-shot where it has reference images), and compares the
    patch-grid anomaly maps and image scores with those of the FP32 encoder."""

    def __init__(self, bundle: Bundle, images: np.ndarray, threads: int | None = None):
        if not bundle.categories:
            raise UsageError(f"bundle {str(bundle.root)!r} has no category to score maps with; "
                             "add one with 'clipinspect add-category' first")
        self.images, self.threads = images, threads
        self.runs = [(c, "zero-shot") for c in bundle.categories]
        self.runs += [(c, "few-shot") for c in bundle.categories
                      if bundle.manifest.categories[c].memory]
        # The FP32 encoder (the standard one) and heads, opened once; a candidate only brings
        # its encoder.
        self.inspector = Inspector.open(bundle, "fp32", "cpu", threads, attention="standard")
        self.reference = self.scores_and_maps(self.inspector.backend.encode(images))

    def scores_and_maps(self, encoded: dict[str, np.ndarray]
                        ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        out = {}
        for category, mode in self.runs:
            scores, grids, _ = self.inspector.score(encoded, category, mode)
            out[(category, mode)] = (scores, grids)
        return out

    def encode(self, model) -> dict[str, np.ndarray]:
        """Encoder outputs of the images through the graph ``model`` (onnxruntime CPU)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        session = ort.InferenceSession(model.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {"images": self.images})))

    def measure(self, model) -> dict:
        """:meth:`agreement` as a dict (its JSON form)."""
        return self.agreement(model).to_dict()

    def agreement(self, model) -> Agreement:
        """Agreement of the graph ``model`` with FP32: the smallest Pearson correlation of maps
        over (category, mode) runs, pooled over the images, and the largest score difference."""
        got = self.scores_and_maps(self.encode(model))
        per_run, worst_score = {}, 0.0
        for run, (ref_scores, ref_maps) in self.reference.items():
            scores, maps = got[run]
            finite = np.isfinite(maps).all() and np.isfinite(scores).all()
            r = float(np.corrcoef(ref_maps.ravel(), maps.ravel())[0, 1]) if finite else -1.0
            per_run[f"{run[0]}/{run[1]}"] = r if np.isfinite(r) else -1.0
            worst_score = max(worst_score, float(np.abs(ref_scores - scores).max())
                              if finite else float("inf"))
        return Agreement(min(per_run.values()), worst_score, int(len(self.images)),
                         map_pearson=per_run)


# ---------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class QuantizeOptions:
    """What to make (``precision``) and from what: ``calibration``, a folder of normal images
    (or an MVTec AD / VisA root; INT8 needs it, FP16 then checks on synthetic images without
    it), the calibration ``method``, the map Pearson ``target`` of the sensitivity pass (auto,
    always or off), ``holdout`` images kept out of calibration to check the maps, at most
    ``max_images`` to calibrate on; ``attention_products``: INT8 also quantizes the
    activation x activation MatMuls (QK^T, attention x V), not only those with a weight."""

    precision: str
    calibration: str | Path | None = None
    method: str = "minmax"
    target: float = DEFAULT_TARGET
    holdout: int | None = None  # None: DEFAULT_HOLDOUT, or POOL_HOLDOUT for a MuSc bundle
    max_images: int = DEFAULT_MAX_IMAGES
    sensitivity: str = "auto"
    overwrite: bool = False
    threads: int | None = None
    attention_products: bool = False
    weight_range: str = "auto"  # full, reduced, or auto: reduced where this CPU's kernels clip

    def validate(self) -> "QuantizeOptions":
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose one of "
                             f"{', '.join(PRECISIONS)} (fp32 is what export writes)")
        if self.sensitivity not in ("auto", "always", "off"):
            raise UsageError(f"--sensitivity {self.sensitivity!r}: choose auto, always or off")
        if self.weight_range not in WEIGHT_RANGES:
            raise UsageError(f"--weight-range {self.weight_range!r}: choose one of "
                             f"{', '.join(WEIGHT_RANGES)}")
        if not 0.0 < self.target <= 1.0:
            raise UsageError(f"--target {self.target} is not a correlation in (0, 1], e.g. 0.99")
        if self.holdout is not None and self.holdout < 1:
            raise UsageError(f"--holdout {self.holdout}: at least 1 held-out image is needed")
        return self


def quantize_bundle(bundle_path: str | Path, precision: str,
                    calibration: str | Path | None = None, **options) -> dict:
    """Make the ``precision`` variant of a bundle's encoder, check it against FP32, store it;
    ``options``: the other fields of :class:`QuantizeOptions`. Returns the record written to
    the manifest under ``quantization.<precision>`` (its JSON form)."""
    return quantize(bundle_path, QuantizeOptions(precision, calibration, **options)).to_dict()


def quantize(bundle_path: str | Path, options: QuantizeOptions) -> Quantization:
    """:func:`quantize_bundle` with its options as one value: validate, select the images,
    make and measure the variant, store it. -> its manifest record."""
    bundle = Bundle.open(bundle_path)
    validate(bundle, options)
    t_start = time.perf_counter()
    images = select_images(bundle, options)
    log("[1] preparing the FP32 graph")
    model = clean_graph(bundle.graph_path("fp32", "encoder"))
    with tempfile.TemporaryDirectory(prefix="clipinspect-quantize-") as tmp:
        agreement = MapAgreement(bundle, images.held, options.threads)
        variant, record, plan = run_variant(model, bundle, images, agreement, Path(tmp), options)
        data = variant.SerializeToString()
        fused = None
        if plan is not None and FUSED_ENCODER in bundle.manifest.graphs["fp32"]:
            fused_graph, record.fused_agreement = fused_int8(bundle, model, plan, agreement,
                                                              Path(tmp))
            fused = fused_graph.SerializeToString()
    rel = write_versioned(bundle.root, options.precision, "encoder.onnx", data)
    fp32 = bundle.manifest.graphs["fp32"]["encoder"]
    entry = bundle.file_entry(rel, inputs=fp32.inputs, outputs=fp32.outputs)
    fused_entry = None
    if fused is not None:
        fused_rel = write_versioned(bundle.root, options.precision, f"{FUSED_ENCODER}.onnx", fused)
        fused_entry = bundle.file_entry(fused_rel, inputs=fp32.inputs, outputs=fp32.outputs)
    register(bundle, options.precision, entry, record, options.overwrite, qdq=variant,
             maps=agreement, fp16=to_fp16, fused=fused_entry)
    log(f"{options.precision} graphs stored in {bundle.root} ({len(data) / 1e6:.0f} MB encoder) "
        f"in {time.perf_counter() - t_start:.0f} s")
    return record


def validate(bundle: Bundle, options: QuantizeOptions) -> None:
    """Refuse options and bundles that cannot give the variant, before minutes of work."""
    options.validate()
    if options.precision in bundle.manifest.graphs and not options.overwrite:
        raise UsageError(f"bundle {str(bundle.root)!r} already has {options.precision} graphs; "
                         "pass --overwrite to replace them")
    bundle.check_writable(options.precision)  # where the encoder goes
    pooled = bundle.method.scorer is not None
    if pooled and options.holdout is not None and options.holdout < POOL_HOLDOUT:
        raise UsageError(f"--holdout {options.holdout}: this {bundle.manifest.method} bundle's "
                         "maps are checked in batch mode, where the held-out images score each "
                         f"other; hold out at least {POOL_HOLDOUT} (--holdout {POOL_HOLDOUT})")
    if options.calibration is None and options.precision == "int8":
        raise UsageError("INT8 needs --calibration DIR: a folder of normal images of the "
                         "line (or an MVTec AD / VisA root, whose train images are used)")


@dataclass
class Images:
    """The images a quantization uses: ``calibration`` (paths; INT8 only), ``held`` out ones
    to check the maps on ((N, 3, H, W), preprocessed) and where they came from (``source``)."""

    calibration: list[Path]
    held: np.ndarray
    source: str


def held_out(bundle: Bundle, options: QuantizeOptions) -> int:
    """How many images check the maps: as given, else 3, or 5 where they score each other."""
    if options.holdout is not None:
        return options.holdout
    return POOL_HOLDOUT if bundle.method.scorer is not None else DEFAULT_HOLDOUT


def select_images(bundle: Bundle, options: QuantizeOptions) -> Images:
    """The last ``holdout`` images are held out, up to ``max_images`` of the rest calibrate;
    without a calibration folder, synthetic probe images are held out (FP16)."""
    holdout, calibration = held_out(bundle, options), options.calibration
    if calibration is None:
        return Images([], probe_images(bundle, holdout), "synthetic probe images")
    paths = find_images(calibration)
    int8 = options.precision == "int8"
    if int8 and len(paths) < holdout + MIN_CALIBRATION_IMAGES:
        raise UsageError(f"found {len(paths)} images under {str(calibration)!r}; INT8 needs "
                         f"at least {holdout + MIN_CALIBRATION_IMAGES} ({holdout} held out "
                         f"to check the maps, the rest to calibrate); add images or lower "
                         f"--holdout")
    held_paths = paths[-holdout:] if len(paths) > holdout else paths
    paths = paths[:-holdout][:options.max_images] if len(paths) > holdout else []
    log(f"loading {len(held_paths)} held-out image(s)" +
        (f" and {len(paths)} calibration image(s)" if int8 else ""))
    return Images(paths, load_tensors(bundle, held_paths), str(Path(calibration).resolve()))


def run_variant(model, bundle: Bundle, images: Images, agreement: MapAgreement, tmp: Path,
                 options: QuantizeOptions):
    """The variant graph of ``model`` (the cleaned FP32 encoder), its manifest record and, for
    INT8, the plan the fused-attention encoder is quantized by (``Int8Plan``); refused when its
    maps are unrelated to FP32's."""
    plan = None
    if options.precision == "fp16":
        variant, measured, how = _fp16(model, agreement)
    else:
        variant, measured, how, plan = _int8(model, bundle, images.calibration, agreement, tmp,
                                             options)
    log(f"    map Pearson (worst category/mode) {measured.map_pearson_min:.5f}, largest "
        f"image score difference {measured.max_image_score_diff:.2e}")
    if not np.isfinite(measured.max_image_score_diff) or measured.map_pearson_min < 0:
        raise QuantizeError(f"the {options.precision} graph gives non-finite or unrelated maps; "
                            "nothing was written")
    stored = dataclasses.replace(measured, source=images.source, target=options.target,
                                 measured_on="patch-grid maps of held-out normal images")
    return variant, Quantization(
        stored, **how, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=_versions()), plan


def _fp16(model, agreement: MapAgreement):
    """-> (FP16 graph, its agreement with FP32, its record's scheme)."""
    log("[2] converting to FP16 (softmax and layer norm kept FP32, FP32 inputs and outputs)")
    variant = to_fp16(model)
    log(f"[3] checking the FP16 maps against FP32 on {len(agreement.images)} held-out image(s)")
    scheme = Scheme("FP16", kept_fp32_ops=list(FP16_KEEP_FP32), io="float32",
                    layer_norm="LayerNormalization in FP32 (Cast in and out)")
    return variant, agreement.agreement(variant), {"scheme": scheme}


def _int8(model, bundle: Bundle, paths: list[Path], agreement: MapAgreement, tmp: Path,
          options: QuantizeOptions):
    """Calibrate, quantize, run the sensitivity pass; -> (graph, its agreement with FP32,
    how it was made: the fields of its record)."""
    import onnx

    groups = weight_groups(model)
    if not groups:
        raise QuantizeError("the encoder has no MatMul with a weight to quantize")
    images = load_tensors(bundle, paths)
    clean_path = tmp / "clean.onnx"
    onnx.save(model, str(clean_path))
    log(f"[2] calibrating activations ({options.method}) on {len(images)} normal image(s)")
    with Progress(len(images), "calibrate") as bar:
        amax = activation_ranges(clean_path, images, options.method, bar.update)
    log(f"[3] quantizing {sum(len(g.nodes) for g in groups)} MatMuls ({len(groups)} weights)")
    products = activation_products(model) if options.attention_products else []
    wmax = weight_max(options.weight_range)
    if wmax != FULL_WEIGHT_MAX:
        log(f"    weights in [-{wmax}, {wmax}] (--weight-range {options.weight_range}"
            + ("; this CPU's onnxruntime INT8 kernels clip full-range weight products"
               if options.weight_range == "auto" else "") + ")")

    def measure(keep: set[str]) -> Agreement:
        return agreement.agreement(quantize_int8(model, groups, amax, keep, products=products,
                                                 weight_max=wmax))

    full = measure(set())
    log(f"    all quantized: map Pearson {full.map_pearson_min:.5f} (target {options.target})")
    sensitivity, excluded, measured = _sensitivity(groups, measure, full, options)
    variant = quantize_int8(model, groups, amax, {g.weight for g in excluded}, products=products,
                            weight_max=wmax)
    how = {"scheme": Scheme("QDQ", ops=["MatMul"], attention_products=len(products),
                            weights=weights_scheme(wmax),
                            activations="int8, symmetric, per tensor, zero point 0"),
           "calibration": Calibration(options.method, len(images)),
           "quantized_nodes": sum(len(g.nodes) for g in groups if g not in excluded),
           "fp32_nodes": sum(len(g.nodes) for g in excluded),
           "all_quantized_agreement": full, "sensitivity": sensitivity}
    if len(excluded) > len(groups) // 2:
        log(f"warning: {len(excluded)} of {len(groups)} weights had to stay FP32 to reach map "
            f"Pearson {options.target}; expect little speed-up (try --calibration-method "
            "entropy or percentile, or a lower --target)")
    return variant, measured, how, Int8Plan(images, options.method, groups,
                                            {g.weight for g in excluded}, wmax)


@dataclass
class Int8Plan:
    """What the standard INT8 encoder was made with: the calibration images and method, its
    weight groups and the weights kept FP32; the fused-attention encoder follows the plan."""

    images: np.ndarray
    method: str
    groups: list[WeightGroup]
    excluded: set[str]
    weight_max: int = FULL_WEIGHT_MAX


def _weight_key(model, group: WeightGroup) -> tuple:
    """A weight by its values (the same constant in both encoders, under other names)."""
    import hashlib

    t = next(t for t in model.graph.initializer if t.name == group.weight)
    return group.shape, hashlib.sha256(t.raw_data or t.SerializeToString()).hexdigest()


def fused_int8(bundle: Bundle, model, plan: Int8Plan, agreement: MapAgreement, tmp: Path):
    """The INT8 form of the bundle's fused-attention FP32 encoder, made like the standard one
    (``model``, cleaned; ``plan``): the same weights quantized (matched by value) and the same
    ones kept FP32, activations calibrated on the same images by the same method. The attention
    products stay FP32 inside the fused operator. -> (graph, its agreement with FP32)."""
    import onnx

    fused = clean_graph(bundle.graph_path("fp32", FUSED_ENCODER))
    groups = weight_groups(fused)
    mine = {_weight_key(fused, g): g for g in groups}
    theirs = {_weight_key(model, g): g for g in plan.groups}
    if mine.keys() != theirs.keys():
        raise QuantizeError(f"the fused-attention encoder's {len(groups)} weights are not the "
                            f"standard encoder's {len(plan.groups)}; export the bundle again")
    excluded = {mine[k].weight for k, g in theirs.items() if g.weight in plan.excluded}
    path = tmp / "clean_fused.onnx"
    onnx.save(fused, str(path))
    log(f"[4b] the fused-attention encoder: calibrating ({plan.method}) on the same "
        f"{len(plan.images)} image(s), quantizing the same {len(groups) - len(excluded)} weights")
    with Progress(len(plan.images), "calibrate") as bar:
        amax = activation_ranges(path, plan.images, plan.method, bar.update)
    variant = quantize_int8(fused, groups, amax, excluded, weight_max=plan.weight_max)
    measured = agreement.agreement(variant)
    log(f"    fused-attention map Pearson {measured.map_pearson_min:.5f}, largest image score "
        f"difference {measured.max_image_score_diff:.2e}")
    if not np.isfinite(measured.max_image_score_diff) or measured.map_pearson_min < 0:
        raise QuantizeError("the fused-attention int8 graph gives non-finite or unrelated maps; "
                            "nothing was written")
    return variant, dataclasses.replace(measured, measured_on="patch-grid maps of held-out "
                                        "normal images")


def _sensitivity(groups: Sequence[WeightGroup], measure: Callable[[set[str]], Agreement],
                 full: Agreement, options: QuantizeOptions
                 ) -> tuple[Sensitivity, list[WeightGroup], Agreement]:
    """The sensitivity pass when ``options.sensitivity`` asks for it (auto: when the graph
    with every weight quantized misses the target); -> (its record, the weights kept FP32,
    the agreement of the graph with them kept FP32)."""
    mode, target = options.sensitivity, options.target
    ran = mode == "always" or (mode == "auto" and full.map_pearson_min < target)
    ranking: list[WeightRank] = []
    excluded: list[WeightGroup] = []
    measured = full
    if ran:
        log(f"[4] sensitivity: map agreement with each of the {len(groups)} weights kept FP32")
        with Progress(len(groups), "sensitivity", unit="weights") as bar:
            ranking, excluded, measured = sensitivity_pass(groups, measure, full, target,
                                                           bar.update)
    else:
        log("[4] sensitivity pass " + ("off" if mode == "off" else
                                      "not needed: the target is met with every MatMul quantized"))
    record = Sensitivity([g.label for g in excluded], ran=ran, mode=mode, target=target,
                         ranking=ranking[:20], excluded_nodes=[n for g in excluded for n in g.nodes])
    return record, excluded, measured


def sensitivity_pass(groups: Sequence[WeightGroup], measure: Callable[[set[str]], Agreement],
                     full: Agreement, target: float, progress: Callable[[], None] | None = None
                     ) -> tuple[list[WeightRank], list[WeightGroup], Agreement]:
    """Rank the weights by how much keeping each one alone in FP32 raises the map agreement
    (``measure(weights kept FP32)`` against FP32), then keep them in FP32 in that order until
    the agreement reaches ``target``. -> (ranking, weights kept FP32, last measurement)."""
    ranking = []
    for g in groups:
        r = measure({g.weight})
        ranking.append(WeightRank(g.label, g.nodes, r.map_pearson_min,
                                  r.map_pearson_min - full.map_pearson_min))
        if progress:
            progress()
    order = sorted(range(len(groups)), key=lambda i: -ranking[i].gain)
    excluded: list[WeightGroup] = []
    measured = full
    for i in order:
        if measured.map_pearson_min >= target:
            break
        excluded.append(groups[i])
        measured = measure({g.weight for g in excluded})
        log(f"    keeping {groups[i].label} in FP32: map Pearson "
            f"{measured.map_pearson_min:.5f}")
    return [ranking[i] for i in order], excluded, measured


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

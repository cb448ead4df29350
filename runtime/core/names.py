"""The names the bundle, the runtime and the tools share, each written once.

Graphs and precisions name files of the bundle contract (manifest.py, docs/bundle-format.md);
modes and providers are what a user chooses; stages are what the Inspector, ``bench`` and
``serve`` time. Every other module imports them from here (tests/test_names.py checks that none
writes one of these tuples out again).
"""

from __future__ import annotations

#: The graphs every precision of a bundle holds: the encoder, then the two scoring heads.
ENCODER = "encoder"
HEAD_ZEROSHOT = "head_zeroshot"
HEAD_FEWSHOT = "head_fewshot"
HEADS = (HEAD_ZEROSHOT, HEAD_FEWSHOT)
GRAPHS = (ENCODER, *HEADS)
#: An optional second encoder of a precision, for onnxruntime only: the same formula with
#: attention as onnxruntime's fused operator (com.microsoft MultiHeadAttention). TensorRT and
#: Triton use ``encoder``.
FUSED_ENCODER = "encoder_fused"
#: Which encoder graph a session runs: the fused one where the bundle has it and the provider
#: is onnxruntime's CPU one (``auto``), or the one named.
ATTENTION_CHOICES = ("auto", "fused", "standard")

#: Graph precisions: fp32 is what export writes, the others what quantize makes from it.
PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZED_PRECISIONS = PRECISIONS[1:]

#: Scoring modes: "auto" is few-shot when the category has reference images, else zero-shot.
AUTO = "auto"
ZERO_SHOT = "zero-shot"
FEW_SHOT = "few-shot"
SCORING_MODES = (ZERO_SHOT, FEW_SHOT)
MODES = (AUTO, *SCORING_MODES)
#: The head graph that scores each mode.
HEAD_OF_MODE = {ZERO_SHOT: HEAD_ZEROSHOT, FEW_SHOT: HEAD_FEWSHOT}

#: Providers: onnxruntime's execution providers, then the native TensorRT engines.
ORT_PROVIDERS = ("cpu", "cuda", "tensorrt")
TENSORRT_NATIVE = "tensorrt-native"
PROVIDERS = (*ORT_PROVIDERS, TENSORRT_NATIVE)

#: The stages of one inspection, in order, each timed on its own: ``load`` decode + resize +
#: normalize on the host; ``encode`` the encoder graph; ``score`` a scoring head (image scores,
#: the grid map); ``post`` upsampling to the input's size, smoothing, thresholds.
LOAD, ENCODE, SCORE, POST = STAGES = ("load", "encode", "score", "post")
#: Wall time of all stages together (bench).
END_TO_END = "end_to_end"
#: What serve reports per request (``timings_ms``): its load stage, its wait in the batch queue,
#: its batch's encode + score + post, and the whole request.
QUEUE, INFERENCE, TOTAL = "queue", "inference", "total"
REQUEST_TIMINGS = (LOAD, QUEUE, INFERENCE, TOTAL)
#: The name ``timings_ms`` gave the load stage before the stages had one vocabulary; still
#: reported, equal to ``load``, so existing clients keep working.
OLD_LOAD_TIMING = "decode"

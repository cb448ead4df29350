"""The models, weights and parity check the export commands default to, apart from the
exporter so that the CLI (and the study's variants) can name them without importing torch."""

DEFAULT_MODEL = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = "laion400m_e31"
# AprilLab's projections are trained on (and APRIL-GAN's were published for) this one.
ADAPTER_MODEL = "ViT-L-14-336"
ADAPTER_PRETRAINED = "openai"
# The export-time check of onnxruntime against the torch modules: largest difference (FP32)
# and how many unseen random images it runs.
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 3
# Whether export also writes the onnxruntime-only encoder with fused attention: off, because
# on ViT-B-16-plus-240 it doubles the encoder files for a few percent on INT8 and none on FP32
# (benchmarks/results/int8_notes_cpu_b16p.md, issue 27); --fused-attention for CPU lines.
FUSED_ATTENTION = False

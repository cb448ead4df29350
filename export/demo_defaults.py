"""The demo's defaults, apart from the demo so that the CLI can show them without torch."""

DEMO_CATEGORIES = ("weave", "washer")
# The smallest open_clip model with pretrained tags: its export takes about a third of
# ViT-B-16-plus-240's, and the synthetic defects need no finer grid than its 7 x 7 patches.
DEMO_MODEL = "ViT-B-32"
DEMO_PRETRAINED = "laion2b_s34b_b79k"

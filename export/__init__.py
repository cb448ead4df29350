"""Torch side: builds ONNX graphs and text embeddings from open_clip models into bundles."""

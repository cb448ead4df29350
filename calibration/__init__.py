"""Precision variants, thresholds, datasets and metrics."""

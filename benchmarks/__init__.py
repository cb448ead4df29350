"""Reproducible speed measurements; results are committed under benchmarks/results/."""

"""Prompt ensembles as data (JSON); code that expands them lives in export/text.py."""

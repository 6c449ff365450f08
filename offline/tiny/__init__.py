"""Tiny offline configurations of every VLM family, one module per family (named after it, `-` and `.` as `_`).

Each module defines `tiny_processor()`, the family's transformers processor built without the Hub over small
images, and `tiny_config(processor, **overrides)`, a tiny random configuration (hidden 64 at most, 1-2 layers)
matching that processor's vocabulary, special tokens and image size.
"""

"""Data sets of vlmheads: record schemas, validation and synthetic generators, as `datasets.Dataset`s."""

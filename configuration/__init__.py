"""Configurations of the vlmheads models."""

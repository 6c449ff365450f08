"""Processors of vlmheads: placeholder expansion, chat templates."""

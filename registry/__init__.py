"""The VLM registry: every family behind one interface."""

"""Model card templates, rendered into README.md when a model is saved or pushed."""

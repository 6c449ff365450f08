"""Fine-tuning helpers: freezing, LoRA, Trainer metrics."""

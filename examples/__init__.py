"""Scripts a user copies: Trainer fine-tuning, ONNX export and demos; `vlmheads SUBCOMMAND` runs some of them."""

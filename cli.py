"""`vlmheads`: one command line for the package; `vlmheads SUBCOMMAND --help` shows each subcommand's flags.

Each subcommand is the `main` of a module that also runs as `python -m ...` (or as a script under `examples/`), named
here as a ("module", "function") pair and imported only when chosen, so that `vlmheads --help` starts fast and a
subcommand needs only its own extra installed.
"""

import importlib
import os
import sys

SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("vlmheads.serve.__main__", "main", "the OpenAI-compatible HTTP server (python -m vlmheads.serve)"),
    "parallel": (
        "vlmheads.parallel.__main__",
        "main",
        "pipeline-parallel inference: `prepare` stage shards, or run a stage under torchrun",
    ),
    "export-onnx": ("vlmheads.examples.export_onnx", "main", "export a model to ONNX graphs"),
    "train-orion": ("vlmheads.examples.train_orion", "main", "fine-tune Orion with the Trainer"),
    "train-vla": ("vlmheads.examples.train_vla", "main", "fine-tune a VLA action head with the Trainer"),
    "train-classifier": (
        "vlmheads.examples.train_classifier",
        "main",
        "fine-tune an image classifier on any VLM family with the Trainer (your photos: one folder per class)",
    ),
    "train-receipts": ("vlmheads.examples.train_receipts", "main", "fine-tune the Mllama receipt classifier"),
    "manipulate": (
        "vlmheads.closed_loop.manipulation",
        "main",
        "Meta-World closed loop: `collect` expert demonstrations, `evaluate` a policy's task success",
    ),
    "drive": ("vlmheads.closed_loop.driving", "main", "highway-env closed loop: `collect` demonstrations, `evaluate`"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, _, about) in SUBCOMMANDS.items()]
    hint = "\n\n`vlmheads SUBCOMMAND --help` shows a subcommand's flags.\n"
    return "usage: vlmheads SUBCOMMAND [ARGS...]\n\nsubcommands:\n" + "\n".join(lines) + hint


def main(argv: list[str] | None = None) -> None:
    """Runs `vlmheads SUBCOMMAND ARGS...`: the subcommand's `main` sees `ARGS` as its command line."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    name, *rest = argv
    if name not in SUBCOMMANDS:
        sys.exit(f"vlmheads: unknown subcommand {name!r}.\n{usage()}")
    module, function, _ = SUBCOMMANDS[name]
    sys.argv = [f"vlmheads {name}", *rest]
    try:
        getattr(importlib.import_module(module), function)()
    except (ValueError, FileNotFoundError, ImportError) as error:
        # Bad input and a missing extra are the user's to fix: one line that names them, not a traceback.
        if os.environ.get("VLMHEADS_TRACEBACK"):
            raise
        sys.exit(f"vlmheads {name}: error: {error} (VLMHEADS_TRACEBACK=1 shows the traceback)")

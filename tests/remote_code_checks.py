"""Checks shared by the remote-code tests of every model."""

import ast
import subprocess
import sys
from pathlib import Path

import torch

# What a Hub user of a saved folder has: the standard library, and transformers with its own dependencies.
ALLOWED_IMPORTS = set(sys.stdlib_module_names) | {
    "numpy",
    "PIL",
    "tokenizers",
    "torch",
    "transformers",
    "huggingface_hub",
}


def assert_flat_self_contained_code(folder: Path, code_files: set[str]) -> None:
    """The folder holds exactly `code_files`, which import each other only from the same folder, and libraries."""
    assert {path.name for path in folder.glob("*.py")} == code_files
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in code_files, (path.name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {name.split(".")[0] for name in names} <= ALLOWED_IMPORTS, (path.name, names)


def run_without_vlmheads(script: str, folder: Path, request: dict, scratch: Path) -> dict:
    """Runs tests/`script` on `folder` and `request` where vlmheads cannot be imported; returns what it saved.

    Checks that every class it loaded came from the folder's code (`transformers_modules.*`).
    """
    here = Path(__file__).parent
    torch.save(request, scratch / "request.pt")
    command = [sys.executable, str(here / "without_vlmheads.py"), str(here / script), str(folder)]
    run = subprocess.run(
        [*command, str(scratch / "request.pt"), str(scratch / "results.pt")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(scratch / "results.pt")
    assert all(name.startswith("transformers_modules.") for name in results["classes"]), results["classes"]
    return results

"""Checks shared by the remote-code tests of every model."""

import ast
import sys
from pathlib import Path

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

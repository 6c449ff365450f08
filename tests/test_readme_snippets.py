"""The README's Python blocks run as written, offline, each in a fresh interpreter, in one scratch folder.

The folders the README's commands make (`outputs/orion_demo`, `outputs/receipts`, `outputs/classifier`,
`outputs/vla`) are made first by those commands, shortened to two training steps. A block that needs the Hub says so
in its first line ("# Needs the Hub") and is followed by its tiny twin ("# Tiny twin"), which runs. The blocks of
the serving, pipeline-parallel, ONNX and closed-loop sections are tested with their own subsystems
(`tests/test_serve*.py`, `tests/test_pipeline_parallel.py`, `tests/test_onnx_*.py`, `tests/test_closed_loop_*.py`):
they need a running server, several processes or a simulator.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_MARK = "# Needs the Hub"
TWIN_MARK = "# Tiny twin"
TESTED_ELSEWHERE = ("## Serving", "## Pipeline-parallel", "## ONNX", "## Closed-loop")
SHORT = ["--max_steps", "2", "--disable_tqdm", "true", "--report_to", "none"]
# The README's commands that make the folders its blocks read, as (script, output folder, extra size flags).
COMMANDS = [
    ("train_orion.py", "outputs/orion_demo", ["--num_train_samples", "32", "--num_eval_samples", "8"]),
    ("train_receipts.py", "outputs/receipts", ["--num_synthetic", "24"]),
    ("train_classifier.py", "outputs/classifier", ["--num_synthetic", "24"]),
    ("train_vla.py", "outputs/vla", ["--num_train_samples", "16", "--num_eval_samples", "4"]),
]


def readme_blocks() -> list[tuple[int, str, str, str]]:
    """(line, language, section, code) of every fenced block of the README."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    blocks, section, index = [], "", 0
    while index < len(lines):
        if lines[index].startswith("## "):
            section = lines[index]
        opening = re.match(r"^```(\w*)\s*$", lines[index])
        if opening:
            end = next(position for position in range(index + 1, len(lines)) if lines[position].startswith("```"))
            blocks.append((index + 1, opening.group(1), section, "\n".join(lines[index + 1 : end])))
            index = end
        index += 1
    return blocks


PYTHON_BLOCKS = [
    block
    for block in readme_blocks()
    if block[1] == "python" and not block[2].startswith(TESTED_ELSEWHERE) and not block[3].startswith(HUB_MARK)
]


def test_every_block_that_needs_the_hub_has_a_tiny_twin():
    blocks = [block for block in readme_blocks() if block[1] == "python"]
    for position, (line, _, _, code) in enumerate(blocks):
        if code.startswith(HUB_MARK):
            following = blocks[position + 1][3] if position + 1 < len(blocks) else ""
            assert following.startswith(TWIN_MARK), f"README.md:{line} needs the Hub and has no tiny twin after it"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder where the README's commands have run (two training steps each)."""
    folder = tmp_path_factory.mktemp("readme")
    for script, output, sizes in COMMANDS:
        command = [sys.executable, str(ROOT / "examples" / script), "--output_dir", output, *sizes, *SHORT]
        result = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"README.md:{block[0]}" for block in PYTHON_BLOCKS])
def test_the_python_block_runs_as_written(block, scratch):
    line, _, _, code = block
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=scratch, env=environment, timeout=600
    )
    assert result.returncode == 0, f"README.md:{line}\n{result.stderr[-3000:]}"

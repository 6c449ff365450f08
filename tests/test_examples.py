import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen2_5_vl"])
def test_the_demo_plans_a_sample_and_reloads_the_saved_model(backbone, tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo_orion.py"), "--backbone", backbone, "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    waypoint_rows = re.findall(r"^\s+(\d\.\d)\s+(-?\d+\.\d{4})\s+(-?\d+\.\d{4})$", run.stdout, flags=re.MULTILINE)
    assert [row[0] for row in waypoint_rows] == ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
    assert "reloaded with AutoModel: same waypoints" in run.stdout
    assert (tmp_path / "modeling_orion_qwen.py").exists() and (tmp_path / "README.md").exists()


def test_the_demo_rejects_an_unknown_backbone():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo_orion.py"), "--backbone", "llava"], capture_output=True, text=True
    )
    assert run.returncode != 0 and "backbone must be one of ['qwen2_5_vl', 'qwen2_vl'], got 'llava'" in run.stderr


# The example scripts each user-facing `--help` describes (demo_closed_loop.py is the closed-loop demo's own).
SCRIPTS = ["classify_receipt", "demo_orion", "export_onnx", "train_classifier", "train_orion", "train_receipts"]
SCRIPTS += ["train_vla"]
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
helps = {}
for path in sys.argv[1:]:
    sys.argv, printed = [path, "--help"], io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        runpy.run_path(path, run_name="__main__")
    helps[path] = printed.getvalue()
print(json.dumps(helps))
"""


@pytest.mark.slow
def test_each_scripts_help_describes_it_and_names_its_inputs():
    paths = [str(EXAMPLES / f"{name}.py") for name in SCRIPTS]
    run = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *paths], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    helps = json.loads(run.stdout)
    for path, text in helps.items():
        # argparse rewraps the description, breaking lines at spaces and hyphens.
        summary = Path(path).read_text().split('"""')[1].split("\n\n")[0]
        assert re.sub(r"\s", "", summary) in re.sub(r"\s", "", text), (path, text[:600])
        assert re.search(r"(schema|Inputs):\s", text), (path, text[:600])
    train_orion = helps[str(EXAMPLES / "train_orion.py")]
    assert "vlmheads.data.driving" in train_orion and "--num_plotted_samples" in train_orion
    assert "Failed to load CPU gemm_4bit_forward" not in run.stderr

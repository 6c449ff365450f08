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

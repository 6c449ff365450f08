import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_one_import_package_with_its_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "--wheel-dir", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("vlmheads-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"vlmheads", wheel.name.split("-py")[0] + ".dist-info"}
    for expected in (
        "vlmheads/configuration/configuration_orion_qwen.py",
        "vlmheads/modeling/modeling_orion_qwen.py",
        "vlmheads/modeling/heads.py",
        "vlmheads/modeling/families.py",
        "vlmheads/registry/vlms.py",
        "vlmheads/offline/tiny/qwen2_vl.py",
        "vlmheads/processing/processing_orion_qwen.py",
        "vlmheads/publishing.py",
        "vlmheads/model_cards/orion_qwen.md",
        "vlmheads/offline/public_configs/qwen2_vl_7b_instruct.json",
        "vlmheads/onnx_export/runtime.py",
        "vlmheads/serve/app.py",
        "vlmheads/cli.py",
        "vlmheads/examples/train_orion.py",
        "vlmheads/parallel/engine.py",
    ):
        assert expected in names

"""The `vlmheads` command: its subcommand table, and bad input as one line that names it."""

import importlib
import subprocess
import sys

import pytest

from vlmheads.cli import SUBCOMMANDS


def run_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmheads", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_names_a_main_that_exists(name):
    module, function, about = SUBCOMMANDS[name]
    assert callable(getattr(importlib.import_module(module), function))
    assert about


def test_help_lists_every_subcommand(tmp_path):
    result = run_cli("--help", tmp_path=tmp_path)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"  {name} " in result.stdout


def test_an_unknown_subcommand_is_refused_with_the_list(tmp_path):
    result = run_cli("fly", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "unknown subcommand 'fly'" in result.stderr and "train-orion" in result.stderr


def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path):
    out = tmp_path / "figures.json"
    args = ("drive", "evaluate", "--model", "expert", "--scenario", "nowhere", "--episodes", "1", "--json", str(out))
    result = run_cli(*args, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("vlmheads drive: error:") and "nowhere" in result.stderr
    assert not out.exists()

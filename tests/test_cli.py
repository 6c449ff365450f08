"""The `vlmheads` command: its subcommand table, and bad input as one line that names it."""

import importlib
import subprocess
import sys

import pytest

from vlmheads.cli import SUBCOMMANDS, main


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


def exit_message(argv: list[str], monkeypatch) -> str:
    """What `vlmheads ARGV` prints on its way out, run in this process (the subprocess above costs an import of
    vlmheads): `sys.exit(message)` prints the message to stderr and exits with status 1."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for the subcommand
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert isinstance(exited.value.code, str), exited.value.code
    return exited.value.code


def test_an_unknown_subcommand_is_refused_with_the_list(monkeypatch):
    message = exit_message(["fly"], monkeypatch)
    assert "unknown subcommand 'fly'" in message and "train-orion" in message


def test_bad_input_is_one_line_naming_it_and_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "figures.json"
    args = ["drive", "evaluate", "--model", "expert", "--scenario", "nowhere", "--episodes", "1", "--json", str(out)]
    message = exit_message(args, monkeypatch)
    assert message.startswith("vlmheads drive: error:") and "nowhere" in message and "\n" not in message
    assert not out.exists()

"""The `vlmheads` commands' help: every flag of every subcommand (and of the training scripts' `TrainingArguments`)
has a help text, read from the parsers in this process (argparse introspection: no subprocess, no model built); the
Trainer flags a script gives other defaults keep transformers' help; `vlmheads parallel` refuses a flag of
`vlmheads serve` by name, saying why."""

import argparse
import dataclasses
import sys
from collections.abc import Iterator

import pytest
from transformers import TrainingArguments

from vlmheads.cli import SUBCOMMANDS
from vlmheads.cli import main as cli_main
from vlmheads.closed_loop.manipulation_env import OBSERVATIONS
from vlmheads.parallel.__main__ import parse_run_args
from vlmheads.serve.options import SERVE_ONLY_FLAGS
from vlmheads.training.runs import trainer_default

# Every subcommand, and `parallel prepare`, whose parser `vlmheads parallel` builds only after the word `prepare`.
COMMANDS = [[name] for name in SUBCOMMANDS] + [["parallel", "prepare"]]
TRAINING_SCRIPTS = [name for name in SUBCOMMANDS if name.startswith("train-")]
TRAINER_FIELDS = TrainingArguments.__dataclass_fields__


class ParserReached(Exception):
    """Raised where a command would parse its arguments: carries the parser it built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def command_parser(command: list[str], monkeypatch) -> argparse.ArgumentParser:
    """The parser `vlmheads COMMAND` reads its arguments with, taken just before it parses them: every parser
    (argparse's and `HfArgumentParser`) parses through `parse_known_args`."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI sets sys.argv for the subcommand

    def reached(parser: argparse.ArgumentParser, *args, **kwargs):
        raise ParserReached(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", reached)
    with pytest.raises(ParserReached) as stopped:
        cli_main(command)
    return stopped.value.parser


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """`parser` and, depth first, the parsers of its subcommands, each with its subcommand path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from parsers(subparser, (*path, name))


def help_texts(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Each argument of `parser` (its option strings, or its name) and each of its subcommands, with its help."""
    texts = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            # add_parser lists a subcommand among `_choices_actions` only when it is given a help.
            described = {choice.dest: choice.help for choice in action._choices_actions}
            texts.update({f"subcommand {name}": described.get(name) for name in action.choices})
        else:
            texts["/".join(action.option_strings) or action.dest] = action.help
    return texts


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_flag_has_a_help_text(command, monkeypatch):
    flags = 0
    for path, parser in parsers(command_parser(command, monkeypatch)):
        where = " ".join(["vlmheads", *command, *path])
        parser.format_help()  # a help with a stray % fails here, as `--help` would
        texts = help_texts(parser)
        flags += sum(flag.startswith("--") and flag != "-h/--help" for flag in texts)
        missing = sorted(flag for flag, text in texts.items() if not (text or "").strip())
        assert not missing, f"`{where}`: no help text for {missing}"
        # Hidden: only the flags of `vlmheads serve` that `vlmheads parallel` refuses by name (tested below).
        hidden = {flag for flag, text in texts.items() if text == argparse.SUPPRESS}
        assert hidden <= set(SERVE_ONLY_FLAGS), f"`{where}`: hidden flags {sorted(hidden)}"
    assert flags > 0, f"`vlmheads {' '.join(command)}`: no flags read"


def expanded_help(parser: argparse.ArgumentParser, dest: str) -> str:
    """The help of the flag `--DEST` as `--help` prints it (defaults filled in), on one line."""
    (action,) = [action for action in parser._actions if f"--{dest}" in action.option_strings]
    return parser._get_formatter()._expand_help(action)


@pytest.mark.parametrize("name", TRAINING_SCRIPTS)
def test_trainer_flags_a_script_gives_other_defaults_keep_transformers_help(name, monkeypatch):
    parser = command_parser([name], monkeypatch)
    (arguments,) = [kind for kind in parser.dataclass_types if issubclass(kind, TrainingArguments)]
    changed = 0
    for declared in dataclasses.fields(arguments):
        parent = TRAINER_FIELDS.get(declared.name)
        if parent is None or not declared.init:
            continue
        old, new = (
            field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            for field in (parent, declared)
        )
        if old == new:
            assert declared.metadata == parent.metadata, declared.name
            continue
        changed += 1
        help_text = expanded_help(parser, declared.name)
        assert help_text.startswith(parent.metadata["help"]), declared.name
        assert help_text.endswith(f"(transformers' default: {old}) (default: {new})"), help_text
    assert changed >= 5, f"{arguments.__name__} gives {changed} Trainer flags other defaults"


def test_trainer_default_keeps_the_parent_metadata_and_names_an_unknown_field():
    parent = TRAINER_FIELDS["learning_rate"]
    assert trainer_default("learning_rate", parent.default).metadata == parent.metadata
    changed = trainer_default("learning_rate", parent.default * 2)
    assert changed.default == parent.default * 2
    assert changed.metadata["help"] == f"{parent.metadata['help']} (transformers' default: {parent.default})"
    with pytest.raises(ValueError, match="'learning_rat' is not a field of TrainingArguments"):
        trainer_default("learning_rat", 1e-3)


def test_the_observation_help_says_what_each_setting_records(monkeypatch):
    parser = dict(parsers(command_parser(["manipulate"], monkeypatch)))[("collect",)]
    help_text = expanded_help(parser, "observation")
    for setting, width in OBSERVATIONS.items():
        assert f"'{setting}' (" in help_text
        assert f"{width} values" in help_text if width else "no state" in help_text


def refusal(argv: list[str], capsys) -> str:
    """What `vlmheads parallel ARGV` prints when argparse stops it (status 2)."""
    with pytest.raises(SystemExit) as exited:
        parse_run_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag", sorted(SERVE_ONLY_FLAGS))
@pytest.mark.parametrize("form", ["separate", "joined", "bare", "before --model"])
def test_the_pipeline_refuses_a_serve_flag_naming_it_and_why(flag, form, capsys):
    argv = {
        "separate": ["--model", "m", flag, "2"],
        "joined": ["--model", "m", f"{flag}=2"],
        "bare": ["--model", "m", flag],
        "before --model": [flag, "2"],  # named before argparse reports the missing --model
    }[form]
    error = refusal(argv, capsys)
    assert (
        f"error: {flag} is a flag of `vlmheads serve` (the single-process server), not of `vlmheads parallel`: "
        in error
    )
    assert SERVE_ONLY_FLAGS[flag] in error
    assert "unrecognized arguments" not in error and "required" not in error


def test_vlmheads_parallel_refuses_a_serve_flag_from_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exited:
        cli_main(["parallel", "--model", "m", "--lora", "style=adapters/style"])
    assert exited.value.code == 2
    assert "--lora is a flag of `vlmheads serve`" in capsys.readouterr().err


def test_the_pipeline_help_names_the_serve_flags_it_refuses(capsys):
    with pytest.raises(SystemExit):
        parse_run_args(["--help"])
    assert f"{', '.join(SERVE_ONLY_FLAGS)}: flags of `vlmheads serve` only" in capsys.readouterr().out

"""The README's shell and Python blocks run as written, offline, section by section, as a new user runs them.

Each `## ` section runs its blocks in order in a scratch folder of its own that looks like a clone (`examples/`,
`.venv/`), each Python block in a fresh interpreter, each shell command through `bash`:
- A block that needs the Hub says so in its first line ("# Needs the Hub") and is followed by its tiny twin
  ("# Tiny twin"), which runs. A block that needs hardware this machine lacks says so in its first line
  ("# Needs two CUDA GPUs", "# Needs two machines") and does not run; the block before it is its one-machine twin.
- A command that starts a server (`python -m vlmheads.serve`, the `vlmheads.parallel` server, `tensorboard`) runs as
  written in a subprocess until it answers; the section's Python blocks after it talk to it; then it gets SIGTERM.
- A training command runs two steps on a few samples (`--max_steps 2`, as the README says); everything else as
  written.
- A command that another test runs the same way (script, launcher and flags; fewer samples) and checks more
  closely runs there, not twice: `RUN_ELSEWHERE` names the test. A command that makes a folder the session fixture
  below makes with the same command (`MADE_BEFORE`) is not run again: the section links that folder.
- Not run here: `bash scripts/run_tests.sh` is CI's own command (`.ci/run`); `bash scripts/run_demo.sh` (setup and two
  training phases, minutes) is covered by its parts: its Orion phase is `examples/train_orion.py`, which the fixture
  below runs to make `outputs/orion_demo` and `tests/test_train_orion.py` runs with the demo's defaults. The
  closed-loop section's commands collect and evaluate for tens of minutes as written; `tests/test_closed_loop_*.py` run
  the same commands on one or two episodes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from pathlib import Path

import httpx
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
HUB_MARK = "# Needs the Hub"
TWIN_MARK = "# Tiny twin"
HARDWARE_MARKS = ("# Needs two CUDA GPUs", "# Needs two machines")
NOT_RUN_HERE = {
    "bash scripts/run_tests.sh": "CI's own command (.ci/run)",
    "bash scripts/run_demo.sh": "the demo: setup and two phases, minutes; its Orion phase makes the fixture's folder",
}
NOT_RUN_SECTIONS = {"## Closed-loop evaluation": "tests/test_closed_loop_*.py run these commands on 1-2 episodes"}
# Two steps on a few samples for each training command, by the script or subcommand it runs.
SHORTER = {
    "train_orion.py": ["--num_train_samples", "32", "--num_eval_samples", "8", "--compare_flow_planner", "false"],
    "train-orion": ["--compare_flow_planner", "false"],
    "train_receipts.py": ["--num_synthetic", "24"],
    "train_classifier.py": ["--num_synthetic", "24"],
    "train_vla.py": ["--num_train_samples", "16", "--num_eval_samples", "4"],
}
STEPS = ["--max_steps", "2", "--disable_tqdm", "true"]
# Folders a section reads and another section (or the demo) makes: made once by the same commands, for every section
# that does not make them itself.
MADE_BEFORE = {
    "outputs/orion_demo": ["examples/train_orion.py", "--output_dir", "outputs/orion_demo"],
    "outputs/vla": ["examples/train_vla.py", "--output_dir", "outputs/vla"],
}
# Commands (by how they start) that another test runs with the same script, launcher and flags and checks more
# closely than a zero exit status: each runs there.
RUN_ELSEWHERE = {
    "torchrun --standalone --nproc_per_node 2 examples/train_orion.py ": (
        "tests/test_train_orion.py::test_two_cpu_processes_train_with_ddp_over_gloo"
    ),
    "accelerate launch --multi_gpu --num_processes 2 examples/train_orion.py ": (
        "tests/test_train_orion.py::test_two_cpu_processes_train_with_ddp_over_gloo"
    ),
    "python examples/train_orion.py --save_strategy steps --save_steps 200 ": (
        "tests/test_train_orion.py::test_resuming_from_a_checkpoint_continues_the_same_loss_curve"
    ),
    "vlmheads train-orion --train_files ": (
        "tests/test_train_orion.py::test_train_orion_reads_query_counts_and_widths_from_the_records"
    ),
    "python examples/train_orion.py --output_dir outputs/orion_tensorboard --report_to tensorboard": (
        "tests/test_tracking.py::test_the_orion_script_reports_to"
    ),
    "python examples/train_receipts.py --output_dir outputs/receipts_trackio --report_to trackio": (
        "tests/test_tracking.py::test_the_receipt_script_reports_to"
    ),
    "python examples/train_vla.py --family smolvlm --action_head flow": (
        "tests/test_vla_examples.py::test_train_vla_trains_any_family_with_any_head_and_reloads_the_saved_model"
    ),
}
BITSANDBYTES_NOISE = "Failed to load CPU gemm_4bit_forward"
TIMEOUT = 900


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


def runnable(block: tuple[int, str, str, str]) -> bool:
    _, language, section, code = block
    return (
        language in ("python", "bash")
        and section not in NOT_RUN_SECTIONS
        and code.strip() not in NOT_RUN_HERE
        and not code.startswith((HUB_MARK, *HARDWARE_MARKS))
    )


SECTIONS: dict[str, list[tuple[int, str, str, str]]] = {}
for _block in filter(runnable, readme_blocks()):
    SECTIONS.setdefault(_block[2], []).append(_block)


def shell_commands(code: str) -> list[str]:
    """The block's commands, one per logical line: comments dropped, continued lines joined, quoted newlines kept."""
    commands, current, quote, index = [], "", None, 0
    while index < len(code):
        char = code[index]
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (not current or current[-1].isspace()):
            index = code.find("\n", index) if "\n" in code[index:] else len(code)
            continue
        elif char == "\\" and code[index + 1 : index + 2] == "\n":
            current, index = current + " ", index + 2
            continue
        elif char == "\n":
            commands.append(current.strip())
            current, index = "", index + 1
            continue
        current += char
        index += 1
    return [command for command in [*commands, current.strip()] if command]


def run_elsewhere(command: str) -> str | None:
    """The test that runs `command` (see `RUN_ELSEWHERE`), else None."""
    return next((test for start, test in RUN_ELSEWHERE.items() if command.startswith(start)), None)


def made_before_output(command: str) -> str | None:
    """The folder that `command` makes when it is one of `MADE_BEFORE`'s commands, else None."""
    return next((output for output, made in MADE_BEFORE.items() if command == " ".join(["python", *made])), None)


def shortened(command: str) -> str:
    """A training command with two steps on a few samples; any other command as written."""
    for name, sizes in SHORTER.items():
        if re.search(rf"(^|[\s/]){re.escape(name)}(\s|$)", command):
            return " ".join([command, *sizes, *STEPS])
    return command


def server_port(command: str) -> int | None:
    """The port a command that starts a server listens on (0: read it from the server's output), else None."""
    parallel_server = "-m vlmheads.parallel" in command and "--prompts" not in command and " prepare " not in command
    if re.search(r"-m vlmheads\.serve(\s|$)", command) or parallel_server:
        port = re.search(r"--port[ =](\d+)", command)
        return int(port.group(1)) if port else 8000
    if command.startswith("tensorboard "):
        return 0
    return None


def environment(folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "TRACKIO_DIR": str(folder / "trackio"),
        "PYTHONWARNINGS": "ignore",
    }


def check(result: subprocess.CompletedProcess, where: str) -> None:
    assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert BITSANDBYTES_NOISE not in result.stderr, f"{where} printed bitsandbytes' kernels warning"


def run_shell(command: str, folder: Path, where: str) -> None:
    if command.startswith("pip install"):
        # From the clone, as the README says; a dry run against what is installed: nothing is downloaded or changed.
        # PIP_NO_BUILD_ISOLATION=0 turns isolation off (pip reads a `--no-…` switch's variable inverted): the build
        # uses the installed setuptools instead of fetching one.
        offline = {"PIP_DRY_RUN": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT,
            env={**environment(folder), **offline},
        )  # fmt: skip
        check(result, where)
        assert "Would install vlmheads" in result.stdout and "does not provide the extra" not in result.stderr
        return
    result = subprocess.run(
        ["bash", "-c", shortened(command)],
        capture_output=True,
        text=True,
        cwd=folder,
        env=environment(folder),
        timeout=TIMEOUT,
    )
    check(result, where)
    # A batch file's failed lines are answered with their errors, not with an exit status.
    for answers in re.findall(r"--output (\S+\.jsonl)", command):
        lines = [json.loads(line) for line in (folder / answers).read_text().splitlines()]
        assert lines and not [line["error"] for line in lines if line.get("error")], (where, lines)


def descendants(pid: int) -> dict[int, str]:
    """The processes under `pid`, each with its start time (so that a reused id is never mistaken for one)."""
    found = {}
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in map(int, children.read_text().split()):
            found |= {child: started(child), **descendants(child)}
    return found


def started(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, IndexError):
        return ""


@contextmanager
def server(command: str, folder: Path, where: str) -> Iterator[None]:
    """Runs `command` as written until it answers; then SIGTERM, and SIGKILL for what still runs after a minute."""
    port, log = server_port(command), folder / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["bash", "-c", command], cwd=folder, env=environment(folder), stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, f"{where}: the server exited\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{where}: no answer in 600 s\n{log.read_text()[-4000:]}"
            announced = re.search(r"http://\S+?:(\d+)/", log.read_text()) if port == 0 else None
            url = f"http://127.0.0.1:{port}/health" if port else announced and f"http://localhost:{announced[1]}/"
            if url:
                try:
                    if httpx.get(url, timeout=2.0).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            time.sleep(0.5)
        yield
    finally:
        # torchrun starts its stages in sessions of their own: SIGTERM reaches them through torchrun.
        under = descendants(process.pid)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for pid, start in under.items():
            if start and started(pid) == start:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert BITSANDBYTES_NOISE not in log.read_text(), f"{where} printed bitsandbytes' kernels warning"


def shared_folder(tmp_path_factory) -> Path:
    """One folder for the whole run, across pytest-xdist workers."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def made_before(tmp_path_factory) -> Path:
    """A clone in which the folders the README's blocks read but do not make exist (made once per run)."""
    shared = shared_folder(tmp_path_factory)
    folder = shared / "readme-made-before"
    with FileLock(str(shared / "readme-made-before.lock")):
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            (folder / "examples").symlink_to(ROOT / "examples")
            for output, command in MADE_BEFORE.items():
                run_shell(" ".join(["python", *command]), folder, f"making {output}")
            (folder / "done").touch()
    return folder


def section_clone(made_before: Path, folder: Path, blocks: list[tuple[int, str, str, str]]) -> Path:
    """A scratch clone for one section: `examples/`, `.venv/`, and the folders made before that the section does
    not write itself, or writes with the command that made them."""
    (folder / "examples").symlink_to(ROOT / "examples")
    (folder / ".venv").symlink_to(VENV)
    run_here = [
        command
        for _, language, _, code in blocks
        if language == "bash"
        for command in shell_commands(code)
        if made_before_output(command) is None
    ]
    written = {name for command in run_here for name in re.findall(r"--(?:output_dir|out_dir|out) (\S+)", command)}
    for output in MADE_BEFORE:
        if output not in written:
            (folder / output).parent.mkdir(parents=True, exist_ok=True)
            (folder / output).symlink_to(made_before / output)
    return folder


def test_each_command_run_elsewhere_is_in_the_readme_and_its_test_exists():
    bash = [code for _, language, _, code in readme_blocks() if language == "bash"]
    commands = [command for code in bash for command in shell_commands(code)]
    for start, test in RUN_ELSEWHERE.items():
        assert any(command.startswith(start) for command in commands), f"no README command starts with {start!r}"
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(encoding="utf-8"), test


def test_every_block_that_needs_the_hub_has_a_tiny_twin():
    blocks = readme_blocks()
    for position, (line, language, _, code) in enumerate(blocks):
        if code.startswith(HUB_MARK):
            following = blocks[position + 1] if position + 1 < len(blocks) else (0, "", "", "")
            assert following[1] == language and following[3].startswith(TWIN_MARK), (
                f"README.md:{line} needs the Hub and has no tiny twin after it"
            )


def test_install_lines_name_the_extras_of_a_clone():
    """`pip install -e ".[a,b]"` from a clone, never from PyPI, with extras that pyproject.toml declares."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert not re.search(r"pip install \S*vlmheads", readme), "vlmheads is not on PyPI"
    lines = re.findall(r"pip install -e [^`\n]*", readme)
    assert lines
    for line in lines:
        assert re.fullmatch(r'pip install -e "\.\[[\w,-]+\]"', line.strip()), line
        named = set(re.search(r"\[([\w,-]+)\]", line)[1].split(","))
        assert named <= extras, (line, named - extras)


def test_the_shell_splitter_keeps_quoted_lines_and_drops_comments():
    code = 'a --x 1 \\\n    --y 2  # two\n# alone\npython -c "\nimport sys  # kept\n"\n'
    assert shell_commands(code) == ["a --x 1      --y 2", 'python -c "\nimport sys  # kept\n"']
    assert shortened("python examples/train_vla.py --family smolvlm").endswith("--max_steps 2 --disable_tqdm true")
    not_training = "python examples/classify_receipt.py --model m"
    assert shortened(not_training) == not_training


@pytest.mark.slow
@pytest.mark.parametrize("section", SECTIONS, ids=[re.sub(r"\W+", "-", name[3:]).strip("-") for name in SECTIONS])
def test_the_section_runs_as_written(section, made_before, tmp_path_factory, tmp_path):
    blocks = SECTIONS[section]
    folder = section_clone(made_before, tmp_path, blocks)
    commands = [command for _, language, _, code in blocks if language == "bash" for command in shell_commands(code)]
    has_servers = any(server_port(command) is not None for command in commands)
    # The README's servers listen on fixed ports: one section with servers at a time.
    ports = FileLock(str(shared_folder(tmp_path_factory) / "readme-ports.lock")) if has_servers else nullcontext()
    with ports, ExitStack() as servers:
        for line, language, _, code in blocks:
            where = f"README.md:{line}"
            if language == "python":
                result = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, cwd=folder,
                    env=environment(folder), timeout=TIMEOUT,
                )  # fmt: skip
                check(result, where)
                continue
            for command in shell_commands(code):
                if run_elsewhere(command) or made_before_output(command):
                    continue
                if server_port(command) is None:
                    run_shell(command, folder, where)
                else:
                    servers.close()  # the server before it, on the same port
                    servers.enter_context(server(command, folder, where))

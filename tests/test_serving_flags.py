"""The serving flags `vlmheads serve` and `vlmheads parallel` share (`vlmheads.serve.options`): declared once, the
same help on both, passed to the server by both, enforced on a pipeline-parallel server, refused where a mode cannot
honour them, and checked on the way in."""

import re

import httpx
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from serve_helpers import chat_body, data_url, free_port, served, tiny_parts

from vlmheads.parallel.__main__ import main as parallel_main
from vlmheads.parallel.__main__ import parse_run_args
from vlmheads.parallel.engine import PipelineEngine
from vlmheads.serve.__main__ import build_parser as serve_parser
from vlmheads.serve.options import SERVE_ONLY_FLAGS, ServerLimits, ServerTimeouts, serve_options

SECTION = "server options:"

LIMIT_FLAGS = [
    *("--host", "0.0.0.0", "--port", "9001", "--api-key", "secret", "--served-model-name", "tiny"),
    *("--max-model-len", "96", "--max-body-bytes", "5000", "--max-images", "1", "--max-image-bytes", "4000"),
    *("--max-image-pixels", "640", "--max-request-pixels", "900", "--body-timeout", "3"),
    *("--timeout-keep-alive", "2", "--header-timeout", "4", "--shutdown-timeout", "7"),
    *("--no-access-log", "--log-level", "WARNING"),
]


def server_section(help_text: str) -> str:
    """The help's "server options" section: from its title to the first line that is not part of it."""
    lines = help_text[help_text.index(SECTION) :].splitlines()
    end = next((index for index, line in enumerate(lines[1:], 1) if line and not line.startswith(" ")), len(lines))
    return "\n".join(lines[:end]).strip()


def parallel_help(capsys) -> str:
    with pytest.raises(SystemExit):
        parse_run_args(["--help"])
    return capsys.readouterr().out


def own_flags(help_text: str) -> set[str]:
    """The flags a command lists under "options:", outside the shared section."""
    section = help_text[help_text.index("\noptions:\n") : help_text.index(SECTION)]
    return set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", section, re.MULTILINE))


def test_both_command_lines_show_one_server_section(capsys, monkeypatch):
    """The shared flags have one help text on both commands; every other flag is one that the other runtime does
    not have (a new flag fails here until it is shared, or known to belong to one runtime)."""
    monkeypatch.setenv("COLUMNS", "120")
    serve_help, pipeline_help = serve_parser().format_help(), parallel_help(capsys)
    assert server_section(pipeline_help) == server_section(serve_help)
    for flag in ("--api-key", "--max-body-bytes", "--max-images", "--max-image-pixels", "--shutdown-timeout"):
        assert flag in server_section(serve_help)
    common = {"--help", "--model", "--threads", "--trust-remote-code"}
    assert own_flags(serve_help) - common == set(SERVE_ONLY_FLAGS)
    assert own_flags(pipeline_help) - common == {
        *("--stages", "--layers", "--prompts", "--output", "--max-active", "--max-context", "--timeout"),
        *("--device", "--no-verify-shards"),
    }


def test_both_command_lines_pass_the_limits_to_the_server():
    """The same flags give `app.serve` the same arguments on both command lines: nothing falls back to a default."""
    expected = {
        "host": "0.0.0.0",
        "port": 9001,
        "api_key": "secret",
        "limits": ServerLimits(
            max_body_bytes=5000,
            max_images=1,
            max_image_bytes=4000,
            max_image_pixels=640,
            max_request_pixels=900,
            body_timeout=3.0,
        ),
        "timeouts": ServerTimeouts(keep_alive=2.0, header=4.0, shutdown=7.0),
        "log_level": "warning",
        "access_log": False,
    }
    parallel_args = parse_run_args(["--model", "m", *LIMIT_FLAGS])
    serve_args = serve_parser().parse_args(LIMIT_FLAGS)
    assert serve_options(parallel_args) == serve_options(serve_args) == expected
    assert parallel_args.served_model_name == serve_args.served_model_name == "tiny"
    assert parallel_args.max_model_len == serve_args.max_model_len == 96


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-body-bytes", "0"], "--max-body-bytes: expected a whole number above 0, got '0'"),
        (["--max-images", "-1"], "--max-images: expected a whole number, 0 or above, got '-1'"),
        (["--max-image-pixels", "many"], "--max-image-pixels: expected a whole number above 0, got 'many'"),
        (["--body-timeout", "nan"], "--body-timeout: expected a finite number above 0, got 'nan'"),
        (["--max-model-len", "0"], "--max-model-len: expected a whole number above 0"),
        (["--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "parallel"])
def test_bad_values_are_refused_naming_the_flag(command, flags, message, capsys):
    with pytest.raises(SystemExit):
        if command == "serve":
            serve_parser().parse_args(flags)
        else:
            parse_run_args(["--model", "m", *flags])
    assert message in capsys.readouterr().err


def test_the_batch_mode_refuses_the_flags_only_a_server_honours(capsys, monkeypatch):
    batch = ["--model", "m", "--prompts", "in.jsonl", "--output", "out.jsonl"]
    with pytest.raises(SystemExit):
        parse_run_args([*batch, "--port", "9001", "--max-body-bytes", "5000", "--no-access-log"])
    error = capsys.readouterr().err
    assert "--port, --max-body-bytes, --no-access-log are not taken with --prompts" in error
    # What the batch mode does honour (the image limits bound OpenAI lines' data URLs), and a key from the
    # environment, which the flag did not set, pass.
    monkeypatch.setenv("VLMHEADS_API_KEY", "from-env")
    args = parse_run_args([*batch, "--max-images", "1", "--max-model-len", "64"])
    assert serve_options(args)["limits"].max_images == 1 and args.max_model_len == 64


def test_the_pipeline_outside_torchrun_says_how_to_start_it(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="started by torchrun .RANK is not set.: `torchrun --standalone"):
        parallel_main(["--model", "m", "--threads", str(torch.get_num_threads())])


@pytest.fixture
def saved_folder(tmp_path):
    model, processor = tiny_parts()
    folder = tmp_path / "orion_demo"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def single_process_group(monkeypatch):
    """torch.distributed's environment for one rank on loopback; the group is destroyed even when a test fails."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
def test_limits_set_on_the_parallel_command_line_are_enforced(saved_folder, single_process_group, monkeypatch):
    """`vlmheads parallel` (one stage, in this process) hands its flags to the server: the app it serves answers
    a body over --max-body-bytes with a 413, one image over --max-images with a 400, and no key with a 401. Only
    uvicorn's blocking loop is swapped for one in a thread that the test can stop."""
    statuses = {}

    def serve_and_probe(engine, *, api_key, limits, **options):
        statuses["engine"] = (type(engine), engine.model_id, engine.max_context, options["timeouts"])
        image = data_url(Image.new("RGB", (8, 8), "gray"))
        headers = {"Authorization": f"Bearer {api_key}"}
        with served(engine, api_key=api_key, limits=limits) as base_url:
            url = f"{base_url}/v1/chat/completions"
            body = {**chat_body("Hi", max_tokens=2), "model": "tiny"}
            statuses["ok"] = httpx.post(url, json=body, headers=headers, timeout=60).status_code
            statuses["no key"] = httpx.post(url, json=body, timeout=60).status_code
            padded = {**body, "user": "x" * 3000}
            statuses["body"] = httpx.post(url, json=padded, headers=headers, timeout=60).json()["error"]["code"]
            two_images = {**chat_body("Hi", image, max_tokens=2), "model": "tiny"}
            two_images["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": image}})
            statuses["images"] = httpx.post(url, json=two_images, headers=headers, timeout=60).json()["error"]["code"]

    monkeypatch.setattr("vlmheads.serve.app.serve", serve_and_probe)
    flags = ["--max-body-bytes", "2500", "--max-images", "1", "--api-key", "k", "--served-model-name", "tiny"]
    flags += ["--max-model-len", "80", "--device", "cpu", "--threads", str(torch.get_num_threads())]
    parallel_main(["--model", str(saved_folder), *flags])
    assert statuses == {
        "engine": (PipelineEngine, "tiny", 80, ServerTimeouts()),
        "ok": 200,
        "no key": 401,
        "body": "body_too_large",
        "images": "too_many_images",
    }

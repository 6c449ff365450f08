"""Tiny Orion and LLaVA models saved for the pipeline tests, their prompts and reference tokens, and a torchrun
launcher."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from orion_helpers import camera_image, driving_prompt
from safetensors.torch import save_file

from vlmheads.offline import ORION_BACKBONES
from vlmheads.serve.models import spread_weights


def pipeline_model(backbone: str, processor, num_layers: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random Orion model with `num_layers` decoder layers, over the processor's full vocabulary, its
    matrices drawn wider so that greedy decoding depends on the prompt."""
    classes = ORION_BACKBONES[backbone]
    config = classes.config(
        **classes.tiny_kwargs(len(processor.tokenizer), num_hidden_layers=num_layers),
        **processor.model_config_kwargs(),
    )
    torch.manual_seed(seed)
    return spread_weights(classes.model(config).eval(), std=0.1, seed=seed)


def driving_inputs(model, processor, index: int, image: bool) -> dict[str, torch.Tensor]:
    """The processor's outputs for prompt `index` (batch of 1), with or without a camera image."""
    config = model.config
    generator = torch.Generator().manual_seed(index)
    inputs = processor(
        text=[driving_prompt(processor, question=f"Where next, {index}?", image=image)],
        images=[camera_image(index)] if image else None,
        scene_queries=torch.randn(1, config.num_scene_queries, config.scene_query_dim, generator=generator),
        history_queries=torch.randn(1, config.num_history_queries, config.history_query_dim, generator=generator),
        can_bus=torch.randn(1, config.can_bus_dim, generator=generator),
        return_tensors="pt",
    )
    return {name: tensor.contiguous() for name, tensor in inputs.items()}


def llava_inputs(processor, index: int, image: bool) -> dict[str, torch.Tensor]:
    """The tiny LLaVA processor's outputs for prompt `index` (batch of 1), with or without an image."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": f"What is in view {index}?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[camera_image(index)] if image else None, return_tensors="pt")
    return {name: tensor.contiguous() for name, tensor in inputs.items()}


def reference_tokens(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[int]:
    """Single-process greedy `generate`, without early stop."""
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def write_prompts(
    folder: Path, model, processor, images: list[bool], max_new_tokens: int, make_inputs=None
) -> tuple[Path, list]:
    """A prompts file whose lines point to saved processor outputs (`make_inputs(index, image)`, default: driving
    prompts); returns it and the reference tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    lines, references = [], []
    for index, image in enumerate(images):
        if make_inputs is None:
            inputs = driving_inputs(model, processor, index, image)
        else:
            inputs = make_inputs(index, image)
        save_file(inputs, folder / f"prompt{index}.safetensors")
        lines.append({"id": f"p{index}", "inputs": f"prompt{index}.safetensors", "max_new_tokens": max_new_tokens})
        references.append(reference_tokens(model, inputs, max_new_tokens))
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, references


def torchrun_command(num_stages: int, *args: str) -> list[str]:
    """`torchrun --standalone` (a free port of its own) running the pipeline with `num_stages` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={num_stages}",
        "-m",
        "vlmheads.parallel",
        *args,
    ]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def kill_torchrun(process: subprocess.Popen) -> None:
    """Kills torchrun and every stage: torchrun starts each stage in a session of its own, so killing torchrun's
    process group alone leaves the stages running."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    stages = children.read_text().split() if children.exists() else []
    for pid in [process.pid, *map(int, stages)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def run_torchrun(num_stages: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Runs torchrun to its end, in a session of its own: past `timeout` every stage is killed, not only torchrun."""
    command = torchrun_command(num_stages, *args)
    process = subprocess.Popen(
        command, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_torchrun(process)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def read_results(path: Path) -> dict[str, dict]:
    return {line["id"]: line for line in map(json.loads, path.read_text().splitlines())}

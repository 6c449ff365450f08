import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlmheads.data.receipts import synthetic_receipts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY_RUN = [
    "--classifier_hidden_dims",
    "64",
    "--classifier_dropout_rates",
    "0.1",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
# The tiny model gains nothing from more threads, and one thread per process keeps a run from stalling in OpenMP
# barriers when other jobs share the two cores.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_fine_tuning_learns_the_receipt_count_and_the_inference_example_uses_the_result(tmp_path):
    """The learning test: fixed seeds, CPU, the tiny offline Mllama, 240 training and 60 held-out photos."""
    output = tmp_path / "receipts"
    train = run(
        [
            sys.executable,
            EXAMPLES / "train_receipts.py",
            "--output_dir",
            output,
            "--num_train_epochs",
            "8",
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "1e-3",
            "--seed",
            "0",
            *TINY_RUN,
        ]
    )
    found = re.search(
        r"held-out accuracy: ([\d.]+) \(majority class of the training set: ([\d.]+)\), macro-F1: ([\d.]+)",
        train.stdout,
    )
    assert found, train.stdout[-3000:]
    accuracy, majority, macro_f1 = map(float, found.groups())
    assert majority == pytest.approx(1 / 3, abs=0.01)
    assert accuracy >= 2 * majority, train.stdout[-3000:]
    assert macro_f1 > 0.5
    assert "240 training and 60 held-out photos; 1 process(es)" in train.stdout

    assert (output / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (output / "README.md").read_text()
    assert "| | accuracy | macro_f1 |" in card and f"| fine-tuned | {accuracy:.3f} |" in card
    assert "| majority class | 0.333 |" in card and "![confusion_matrix.png](confusion_matrix.png)" in card
    assert json.loads((output / "eval_results.json").read_text())["fine-tuned"]["accuracy"] == pytest.approx(
        accuracy, abs=5e-4
    )

    # The inference example loads the folder through the Auto classes and its own code.
    example = synthetic_receipts(3, seed=11).filter(lambda row: row["label"] == 2)[0]
    example["image"].save(tmp_path / "photo.png")
    classify = run(
        [
            sys.executable,
            EXAMPLES / "classify_receipt.py",
            "--model",
            output,
            "--image",
            tmp_path / "photo.png",
            "--question",
            "What is the total?",
        ]
    )
    rows = re.findall(r"^\s+(0|1|2 or more)\s+([\d.]+)$", classify.stdout, flags=re.MULTILINE)
    assert sorted(label for label, _ in rows) == ["0", "1", "2 or more"]
    assert sum(float(score) for _, score in rows) == pytest.approx(1.0, abs=2e-3)
    assert re.search(r"photo.png: (0|1|2 or more) receipt\(s\)", classify.stdout)
    assert re.search(r"^Q: What is the total\?\nA: '.*'$", classify.stdout, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.slow
def test_qlora_with_gradient_accumulation_on_two_cpu_processes(tmp_path):
    # `accelerate launch --multi_gpu` is torchrun underneath; without CUDA the example sets use_cpu: DDP over gloo.
    output = tmp_path / "qlora"
    train = run(
        [
            *ACCELERATE,
            "--multi_gpu",
            "--num_processes",
            "2",
            EXAMPLES / "train_receipts.py",
            "--output_dir",
            output,
            "--load_in_4bit",
            "--lora",
            "--pooling",
            "multimodal",
            "--num_synthetic",
            "30",
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            *TINY_RUN,
        ]
    )
    assert "24 training and 6 held-out photos; 2 process(es)" in train.stdout
    assert "Saved the LoRA adapters with the head" in train.stdout
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]
    assert adapter["target_modules"].startswith(r"model\.language_model\.")
    assert "text decoder in 4-bit" in (output / "README.md").read_text()


@pytest.mark.slow
def test_the_example_runs_under_accelerate_launch_cpu(tmp_path):
    # accelerate 1.15 runs `--cpu` jobs with its simple launcher: one process, whatever --num_processes says.
    train = run(
        [
            *ACCELERATE,
            "--cpu",
            "--num_processes",
            "2",
            EXAMPLES / "train_receipts.py",
            "--output_dir",
            tmp_path / "int8",
            "--load_in_8bit",
            "--lora",
            "--num_synthetic",
            "15",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            *TINY_RUN,
        ]
    )
    assert "12 training and 3 held-out photos; 1 process(es)" in train.stdout
    assert (tmp_path / "int8" / "adapter_model.safetensors").exists()


def test_a_quantized_decoder_without_lora_is_refused(tmp_path, monkeypatch):
    """The script's own command line, parsed in this process (a subprocess would cost a fresh import of vlmheads):
    the refusal comes right after parsing, before any data or model."""
    arguments = ["--output_dir", str(tmp_path), "--load_in_4bit", "--num_synthetic", "6"]
    monkeypatch.setattr(sys, "argv", ["train_receipts.py", *arguments])
    from vlmheads.examples.train_receipts import main

    with pytest.raises(
        ValueError, match=r"A quantized decoder trains through LoRA adapters: add --lora to --load_in_4bit/8bit\."
    ):
        main()

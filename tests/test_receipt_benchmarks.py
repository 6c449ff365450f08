"""The receipt benchmark scripts run and report their tables; their figures live in BENCHMARKS.md and the card."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def run(script: str, *arguments: str) -> str:
    # One thread: the check is of the report, not of speed, and a shared CPU then cannot stall it.
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_the_head_benchmark_times_both_poolings_against_bare_mllama_and_measures_quantized_memory():
    small = (
        "--hidden_size 64 --num_layers 2 --vision_hidden_size 64 --vision_layers 2 --image_size 28 --vocab_size 512"
    )
    output = run("bench_receipt_head.py", *small.split(), "--batch_size", "2", "--repeats", "2", "--warmup", "1")
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", output, flags=re.MULTILINE)
    assert [row[0] for row in rows] == [
        "MllamaForConditionalGeneration (bare)",
        'ReceiptVLClassifier pooling="vision"',
        'ReceiptVLClassifier pooling="multimodal"',
    ]
    assert all(float(value) > 0 for row in rows for value in row[1:])
    assert re.search(r"time ratio \(vision pooling / bare Mllama, medians\): \d+\.\d{3}", output)
    assert re.search(r"time ratio \(multimodal pooling / bare Mllama, medians\): \d+\.\d{3}", output)
    assert (
        "text decoder calls in 3 forwards each: MllamaForConditionalGeneration (bare): 3, ReceiptVLClassifier "
        'pooling="vision": 0, ReceiptVLClassifier pooling="multimodal": 3'
    ) in output

    memory = dict(
        (label, (float(measured), float(estimate)))
        for label, measured, estimate in re.findall(
            r"^\| (full precision \(float32\)|8-bit decoder|4-bit NF4 decoder) \| ([\d.]+) \| ([\d.]+) \|",
            output,
            flags=re.MULTILINE,
        )
    )
    assert list(memory) == ["full precision (float32)", "8-bit decoder", "4-bit NF4 decoder"]
    for measured, estimate in memory.values():
        assert measured == estimate  # the meta-device formulas are exact for bitsandbytes' storage
    assert memory["4-bit NF4 decoder"][0] < memory["8-bit decoder"][0] < memory["full precision (float32)"][0]
    assert "one QLoRA training step (batch 2), peak GPU memory: n/a on the CPU" in output


@pytest.mark.slow
def test_the_memory_table_of_the_11b_model_is_the_one_in_the_model_card():
    output = run("receipt_memory_table.py")
    assert "10,673,567,014 parameters (3,346,179 in the head); 280 decoder Linear layers" in output
    rows = re.findall(r"^\|.+\|$", output, flags=re.MULTILINE)
    assert len(rows) == 8  # header, rule, six settings
    settings = {row.split(" | ")[0].lstrip("| "): row for row in rows[2:]}
    assert list(settings) == [
        "inference, bf16",
        "inference, 8-bit (LLM.int8) decoder",
        "inference, 4-bit NF4 decoder",
        "full fine-tuning, bf16",
        "LoRA r=8, bf16 base",
        "QLoRA r=8, NF4 base",
    ]
    bf16, int8, nf4 = (float(settings[name].split(" | ")[1]) for name in list(settings)[:3])
    assert 21 < bf16 < 22 and nf4 < int8 < bf16 / 1.5
    assert "The claim does not hold." in output
    card = (ROOT / "model_cards" / "receipt_vl.md").read_text()
    for row in rows:
        assert row in card, row

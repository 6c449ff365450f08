"""The benchmark scripts run and report their table; their figures live in BENCHMARKS.md, not in assertions."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_forward_benchmark_reports_both_models_and_the_ratios():
    small = "--hidden_size 64 --num_layers 1 --num_scene_queries 8 --num_history_queries 4 --num_text_tokens 8"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_orion_forward.py"),
            *small.split(),
            "--repeats",
            "2",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "20 tokens (8 scene + 4 history + 8 text)" in run.stdout
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", run.stdout, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["Qwen2VLForConditionalGeneration", "OrionQwenForTrajectory"]
    assert all(float(value) > 0 for row in rows for value in row[1:])
    assert re.search(r"time ratio \(Orion / plain, medians\): \d+\.\d{3}", run.stdout)


def test_the_training_benchmark_reports_throughput_and_step_memory():
    small = "--hidden_size 64 --num_layers 1 --num_scene_queries 4 --num_history_queries 2 --batch_size 2"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_orion_training.py"), *small.split(), "--steps", "2", "--rounds", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rates = re.findall(r"^\| (Trainer \+ OrionDataCollator|bare loop[^|]*) \| ([\d.]+) \|", run.stdout, flags=re.M)
    assert len(rates) == 2 and all(float(rate) > 0 for _, rate in rates)
    assert re.search(r"data path and Trainer cost: -?\d+\.\d %", run.stdout)
    memory = dict(re.findall(r"^\| (trajectory[^|]*) \| ([\d.]+) \|$", run.stdout, flags=re.M))
    assert float(memory["trajectory + text loss (full-vocabulary logits)"]) > float(memory["trajectory loss"])


@pytest.mark.slow
def test_the_serving_benchmark_reports_the_batching_gain_and_the_load_test():
    small = "--requests 4 --max_tokens 4 --load_requests 8 --clients 4"
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_serve.py"), *small.split()], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rates = re.findall(r"^\| (1|4) \| 16 \| [\d.]+ \| ([\d.]+) \|$", run.stdout, flags=re.M)
    assert [clients for clients, _ in rates] == ["1", "4"] and all(float(rate) > 0 for _, rate in rates)
    assert re.search(r"batching gain \(4 clients / 1 client, tokens/s\): \d+\.\d\dx", run.stdout)
    assert re.search(r"^\| 8 \| 0 \| 0 \|", run.stdout, flags=re.M)  # every request answered, no 5xx

"""The ONNX benchmark CLI runs at tiny sizes and prints its table; its figures live in BENCHMARKS.md."""

import importlib.util
import re
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_onnx.py"
TINY = (
    "--hidden-size 32 --layers 1 --heads 2 --kv-heads 1 --vocab-size 300 --vision-depth 1 --vision-width 32 "
    "--image-size 56 --text-tokens 4 --new-tokens 2 --repeats 1"
)


@pytest.mark.slow
def test_onnx_benchmark_prints_speeds_of_all_engines_and_the_int8_agreement(capsys):
    spec = importlib.util.spec_from_file_location("bench_onnx", BENCHMARK)
    bench_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_onnx)
    bench_onnx.main(TINY.split())
    printed = capsys.readouterr().out
    assert "one 56x56 image (4 image tokens)" in printed
    number = r"-?[\d.]+"
    for row in ("prefill \\(ms\\)", "decode per token \\(ms\\)"):
        assert re.search(
            rf"^\| {row} \| {number} \| {number} \| {number}x \| {number} \| {number}x \|$", printed, re.M
        )
    assert re.search(
        rf"^\| vision tower \(ms\) \| {number} \| {number} \| {number}x \| same graph \|  \|$", printed, re.M
    )
    assert "greedy tokens identical (PyTorch vs ORT fp32, 2 new tokens): True" in printed
    agreement = re.search(r"top-1 agreement .*: ([\d.]+)$", printed, re.M)
    assert agreement and 0 <= float(agreement.group(1)) <= 1


def test_onnx_benchmark_needs_two_new_tokens():
    spec = importlib.util.spec_from_file_location("bench_onnx", BENCHMARK)
    bench_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_onnx)
    with pytest.raises(ValueError, match="--new-tokens must be at least 2"):
        bench_onnx.main(["--new-tokens", "1"])

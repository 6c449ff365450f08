"""The ONNX benchmark CLI runs at tiny sizes and prints its table; its figures live in BENCHMARKS.md."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_onnx.py"
# GenAI and torch.compile rows are left out here: the first needs the optional genai extra, the second minutes of
# compilation.
TINY = (
    "--hidden-size 32 --layers 1 --heads 2 --kv-heads 1 --vocab-size 300 --prompt-tokens 8 --new-tokens 3 "
    "--repeats 1 --agreement-prompts 2 --no-genai --no-compile"
)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_onnx", BENCHMARK)
    bench_onnx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_onnx)
    return bench_onnx


@pytest.mark.slow
def test_onnx_benchmark_prints_a_row_per_engine(capsys):
    load_benchmark().main(TINY.split())
    printed = capsys.readouterr().out
    assert "text prompt 8 tokens, N = 3 new tokens" in printed
    assert re.search(r"copy bandwidth [\d.]+ GB/s", printed)
    assert re.search(
        r"^fp32 MatMuls alone: [\d.]+ ms per step \([\d.]+ ms CPU time\), [\d.]+x the bandwidth", printed, re.M
    )
    number = r"-?[\d.]+"
    for engine in ("OnnxVLM fp32", "OnnxVLM int8", "OnnxVLM int4", "PyTorch eager"):
        row = re.search(
            rf"^\| {engine} \| {number} \| {number} \| {number} \| {number}x \| (\d+) \| ({number}) "
            rf"\| {number} \({number} MB\) \| ({number}|-) \| (True|False) \|$",
            printed,
            re.M,
        )
        assert row, f"no row for {engine} in:\n{printed}"
        assert int(row.group(1)) > 0 and 0 <= float(row.group(2)) <= 1
        # The MatMuls-alone ratio is given for the engines that read the fp32 weights only.
        assert (row.group(3) == "-") == ("int" in engine)
    assert re.search(r"^\| OnnxVLM fp32 \| .* \| 1\.000 \| .* \| True \|$", printed, re.M)
    assert re.search(r"^\| PyTorch eager \| .* \| True \|$", printed, re.M)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_bandwidth_copy_moves_every_element_on_each_thread_count(threads):
    source, target = np.arange(1001, dtype=np.float64), np.zeros(1001)
    load_benchmark().parallel_copy(target, source, threads)()
    np.testing.assert_array_equal(target, source)


def test_sessions_use_one_thread_or_the_shared_pool():
    session_options = load_benchmark().session_options
    assert session_options(1).intra_op_num_threads == 1 and session_options(1).use_per_session_threads
    assert not session_options(2).use_per_session_threads


def test_onnx_benchmark_needs_two_new_tokens():
    with pytest.raises(ValueError, match="--new-tokens must be at least 2"):
        load_benchmark().main(["--new-tokens", "1"])

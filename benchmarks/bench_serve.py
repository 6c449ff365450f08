"""Throughput and latency of the single-process server (`python -m vlmheads.serve`, LocalEngine) on the CPU.

The server runs in a subprocess on one torch thread, serving the embedded tiny Orion model (or `--model DIR`).
Three runs over HTTP, with greedy decoding:

1. one client at a time: `requests` chat requests of `max_tokens` tokens, one after the other;
2. `clients` concurrent clients sending the same requests: the aggregate completion tokens/s, whose ratio to (1) is
   the gain of continuous batching;
3. a load test: `clients` concurrent clients send `load_requests` mixed requests (plain and streamed, some with an
   image, 1-8 tokens): the server's p50 / p99 latency and the count of 5xx answers.

    python benchmarks/bench_serve.py                      # the BENCHMARKS.md configuration
    python benchmarks/bench_serve.py --model outputs/orion_demo
"""

import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image
from transformers import HfArgumentParser


@dataclass
class BenchmarkArguments:
    model: str | None = field(
        default=None, metadata={"help": "A saved model folder; the embedded tiny model if unset."}
    )
    clients: int = field(default=16, metadata={"help": "Concurrent clients."})
    requests: int = field(default=32, metadata={"help": "Requests of the throughput runs."})
    max_tokens: int = field(default=32, metadata={"help": "Completion tokens per throughput request."})
    load_requests: int = field(default=200, metadata={"help": "Requests of the load test."})
    max_batch_size: int = field(default=16)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: BenchmarkArguments) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "vlmheads.serve", "--port", str(port), "--threads", "1", "--log-level", "warning"]
    command += ["--max-batch-size", str(args.max_batch_size)]
    if args.model is not None:
        command += ["--model", args.model]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited with {process.returncode}.")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("The server did not start within 300 s.")


def camera_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat_request(index: int, max_tokens: int, image: bool, stream: bool) -> dict:
    content = [{"type": "text", "text": f"Request {index}: describe the road " + "ahead " * (index % 7)}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": camera_url(index)}})
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


def send(http: httpx.Client, base_url: str, body: dict) -> tuple[int, int, float]:
    """(HTTP status, completion tokens, latency in seconds) of one request."""
    start = time.perf_counter()
    if body["stream"]:
        tokens = 0
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"usage":{' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
        return response.status_code, tokens, time.perf_counter() - start
    response = http.post(f"{base_url}/v1/chat/completions", json=body)
    tokens = response.json().get("usage", {}).get("completion_tokens", 0) if response.status_code == 200 else 0
    return response.status_code, tokens, time.perf_counter() - start


def run_requests(base_url: str, bodies: list[dict], clients: int) -> tuple[list[tuple[int, int, float]], float]:
    """Results of `bodies` sent by `clients` concurrent clients, and the wall time of the whole run."""
    clients_by_thread: dict[int, httpx.Client] = {}

    def one(body: dict) -> tuple[int, int, float]:
        thread = threading.get_ident()
        if thread not in clients_by_thread:
            clients_by_thread[thread] = httpx.Client(timeout=300)
        return send(clients_by_thread[thread], base_url, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - start
    for http in clients_by_thread.values():
        http.close()
    return results, wall


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    process, base_url = start_server(args)
    try:
        model_id = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        warmup = [chat_request(index, 4, image=index % 2 == 0, stream=False) for index in range(4)]
        run_requests(base_url, warmup, 4)
        bodies = [chat_request(index, args.max_tokens, image=False, stream=False) for index in range(args.requests)]
        sequential, sequential_wall = run_requests(base_url, bodies, 1)
        concurrent, concurrent_wall = run_requests(base_url, bodies, args.clients)
        load_bodies = [
            chat_request(index, 1 + index % 8, image=index % 4 == 0, stream=index % 3 == 0)
            for index in range(args.load_requests)
        ]
        load, load_wall = run_requests(base_url, load_bodies, args.clients)
    finally:
        process.terminate()
        process.wait(60)

    def tokens_per_second(results: list[tuple[int, int, float]], wall: float) -> float:
        return sum(tokens for _, tokens, _ in results) / wall

    single = tokens_per_second(sequential, sequential_wall)
    batched = tokens_per_second(concurrent, concurrent_wall)
    latencies = [latency for _, _, latency in load]
    print(f"Server: python -m vlmheads.serve ({model_id}), CPU, 1 torch thread, max batch {args.max_batch_size}")
    print(f"Throughput: {args.requests} greedy requests of up to {args.max_tokens} tokens")
    print()
    print("| clients | completion tokens | wall [s] | tokens/s |")
    print("|---|---|---|---|")
    for clients, results, wall in ((1, sequential, sequential_wall), (args.clients, concurrent, concurrent_wall)):
        tokens = sum(tokens for _, tokens, _ in results)
        print(f"| {clients} | {tokens} | {wall:.2f} | {tokens / wall:.1f} |")
    print()
    print(f"batching gain ({args.clients} clients / 1 client, tokens/s): {batched / single:.2f}x")
    print()
    statuses = [status for status, _, _ in load]
    print(
        f"Load test: {args.clients} clients, {args.load_requests} requests "
        "(1-8 tokens, 1/4 with an image, 1/3 streamed)"
    )
    print()
    print("| answered | 5xx | other errors | wall [s] | requests/s | p50 latency [ms] | p99 latency [ms] |")
    print("|---|---|---|---|---|---|---|")
    server_errors = sum(status >= 500 for status in statuses)
    other_errors = sum(400 <= status < 500 for status in statuses)
    print(
        f"| {sum(status == 200 for status in statuses)} | {server_errors} | {other_errors} | {load_wall:.2f} | "
        f"{len(load) / load_wall:.1f} | {statistics.median(latencies) * 1000:.0f} | "
        f"{percentile(latencies, 0.99) * 1000:.0f} |"
    )


if __name__ == "__main__":
    main()
